/**
 * Summarises V8 CPU profiles (from `npm run bench -- --profile DIR`): the
 * functions with the most self time, grouped by function and file.
 *   node -r ts-node/register/transpile-only bench/profile.ts DIR [top]
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

interface Node {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}

const dir = process.argv[2];
const top = Number(process.argv[3] ?? 25);
for (const f of fs.readdirSync(dir).filter((x) => x.endsWith('.cpuprofile'))) {
  const prof = JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8')) as { nodes: Node[]; samples: number[]; timeDeltas: number[] };
  const self = new Map<number, number>();
  prof.samples.forEach((id, i) => self.set(id, (self.get(id) ?? 0) + (prof.timeDeltas[i] ?? 0)));
  const byFn = new Map<string, number>();
  let total = 0;
  for (const n of prof.nodes) {
    const t = self.get(n.id) ?? 0;
    total += t;
    const file = n.callFrame.url.replace(/^.*\/(node_modules\/)?/, '$1') || '(native)';
    const key = `${n.callFrame.functionName || '(anonymous)'}  ${file}:${n.callFrame.lineNumber + 1}`;
    byFn.set(key, (byFn.get(key) ?? 0) + t);
  }
  console.log(`\n${f}: ${(total / 1e6).toFixed(1)} s sampled`);
  for (const [k, t] of [...byFn].sort((a, b) => b[1] - a[1]).slice(0, top)) {
    console.log(`${((100 * t) / total).toFixed(1).padStart(5)}%  ${k}`);
  }
}
