/**
 * `npm run bench:startup [-- --runs 5 --idle 3 --no-source --no-npx]`
 *
 * How long `tether serve` takes to start, and what it holds when idle:
 * - compiled: `node bin/tether.js serve` running dist/ (what `npm install -g` gives);
 * - source: the same through ts-node (TETHER_SOURCE=1), as every start was before the build;
 * - npx: `npx tether serve` in the repository, the compiled code behind npm's wrapper (the RSS
 *   is the sum of npm, sh and tether).
 * Each run: a fresh process with a config on free loopback ports, from a temporary folder. Start-up
 * is the time from spawn until it logs "listening" (the device port) and until the dashboard is
 * served (its last start-up line); RSS is read from /proc after `--idle` seconds of idling; then
 * SIGTERM, and the time it takes to exit. `tether --version` and `tether help` are timed as well.
 * Runs of the modes are interleaved; the table shows median (min-max). Every loop is bounded.
 * Writes bench/results/startup.json.
 */
import { ChildProcess, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

const ROOT = path.join(__dirname, '..');
const BIN = path.join(ROOT, 'bin', 'tether.js');
const RESULTS = path.join(__dirname, 'results');

const { values: args } = parseArgs({
  options: {
    runs: { type: 'string', default: '5' },
    idle: { type: 'string', default: '3' },
    'no-source': { type: 'boolean', default: false },
    'no-npx': { type: 'boolean', default: false },
  },
});
const RUNS = Math.min(50, Math.max(1, Number(args.runs)));
const IDLE_MS = Math.min(60, Math.max(0, Number(args.idle))) * 1000;

type Mode = 'compiled' | 'source' | 'npx';

interface Run {
  listenMs: number;
  readyMs: number;
  rssMb: number;
  stopMs: number;
  exitCode: number | null;
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

/** A process and its descendants (Linux /proc). */
function tree(pid: number): number[] {
  const all: number[] = [];
  const visit = (p: number) => {
    let tasks: string[];
    try {
      tasks = fs.readdirSync(`/proc/${p}/task`);
    } catch {
      return;
    }
    all.push(p);
    for (const task of tasks) {
      let kids = '';
      try {
        kids = fs.readFileSync(`/proc/${p}/task/${task}/children`, 'utf8');
      } catch {
        /* gone */
      }
      for (const k of kids.split(' ').filter(Boolean)) visit(Number(k));
    }
  };
  visit(pid);
  return all;
}

/** VmRSS of these processes together, in MB. */
function rssMb(pids: number[]): number {
  let kb = 0;
  for (const p of pids) {
    try {
      kb += Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${p}/status`, 'utf8'))?.[1] ?? 0);
    } catch {
      /* gone */
    }
  }
  return kb / 1024;
}

/** True while the process runs (a zombie, dead but not yet reaped, counts as gone). */
function running(pid: number): boolean {
  try {
    return !/^State:\s+Z/m.test(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  } catch {
    return false;
  }
}

function waitFor(proc: ChildProcess, out: () => string, what: RegExp, ms: number): Promise<number> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const timer = setInterval(() => {
      if (what.test(out())) {
        clearInterval(timer);
        resolve(performance.now() - t0);
      } else if (proc.exitCode !== null || performance.now() - t0 > ms) {
        clearInterval(timer);
        reject(new Error(`no ${what} within ${ms} ms (exit ${proc.exitCode}):\n${out()}`));
      }
    }, 2);
  });
}

async function once(mode: Mode, dir: string): Promise<Run> {
  const file = path.join(dir, `tether-${mode}.json`);
  fs.writeFileSync(
    file,
    JSON.stringify({ host: '127.0.0.1', port: await freePort(), http: { host: '127.0.0.1', port: await freePort() }, log: { level: 'info', format: 'pretty' } }),
  );
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env.TETHER_SOURCE;
  if (mode === 'source') env.TETHER_SOURCE = '1';
  const t0 = performance.now();
  const proc =
    mode === 'npx'
      ? spawn('npx', ['--no-install', 'tether', 'serve', '--config', file], { cwd: ROOT, env, detached: true })
      : spawn(process.execPath, [BIN, 'serve', '--config', file], { cwd: dir, env });
  let out = '';
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (out += d));
  try {
    await waitFor(proc, () => out, / listening host=/, 60_000);
    const listenMs = performance.now() - t0;
    await waitFor(proc, () => out, /dashboard: /, 60_000);
    const readyMs = performance.now() - t0;
    await new Promise((r) => setTimeout(r, IDLE_MS));
    const pids = tree(proc.pid!);
    const rss = rssMb(pids);
    const s0 = performance.now();
    const exited = new Promise<number | null>((r) => proc.once('exit', (c) => r(c)));
    // SIGTERM to the process we started only (for npx: npm), as a service manager or kill(1) would.
    proc.kill('SIGTERM');
    const exitCode = await Promise.race([exited, new Promise<null>((r) => setTimeout(() => r(null), 15_000))]);
    // Stopped means every process of the tree is gone (with npx, tether itself, not only npm).
    for (let i = 0; i < 3000 && pids.some(running); i++) await new Promise((r) => setTimeout(r, 5));
    const stopMs = performance.now() - s0;
    if (pids.some(running)) throw new Error(`${mode}: still running 15 s after SIGTERM: ${pids.filter(running).join(', ')}`);
    return { listenMs, readyMs, rssMb: rss, stopMs, exitCode };
  } finally {
    if (proc.exitCode === null) {
      try {
        if (mode === 'npx') process.kill(-proc.pid!, 'SIGKILL');
        else proc.kill('SIGKILL');
      } catch {
        /* gone */
      }
    }
  }
}

function timeCommand(argv: string[], env: NodeJS.ProcessEnv): number {
  const t0 = performance.now();
  const r = spawnSync(process.execPath, [BIN, ...argv], { env, encoding: 'utf8', timeout: 60_000, cwd: os.tmpdir() });
  if (r.status !== 0) throw new Error(`tether ${argv.join(' ')} exited ${r.status}: ${r.stderr}`);
  return performance.now() - t0;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
const fmt = (xs: number[], digits = 0) =>
  `${median(xs).toFixed(digits)} (${Math.min(...xs).toFixed(digits)}-${Math.max(...xs).toFixed(digits)})`;

async function main(): Promise<void> {
  if (!fs.existsSync(path.join(ROOT, 'dist', 'src', 'cli.js'))) throw new Error('no build in dist/: run npm run build first');
  const modes: Mode[] = ['compiled'];
  if (!args['no-source']) modes.push('source');
  if (!args['no-npx']) modes.push('npx');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-startup-'));
  const runs: Record<Mode, Run[]> = { compiled: [], source: [], npx: [] };
  const commands: Record<string, number[]> = {};
  try {
    for (let i = 0; i < RUNS; i++) {
      for (const mode of modes) {
        const r = await once(mode, dir);
        runs[mode].push(r);
        process.stderr.write(
          `run ${i + 1}/${RUNS} ${mode}: listening ${r.listenMs.toFixed(0)} ms, dashboard ${r.readyMs.toFixed(0)} ms, ` +
            `RSS ${r.rssMb.toFixed(1)} MB, stopped in ${r.stopMs.toFixed(0)} ms (exit ${r.exitCode})\n`,
        );
      }
      for (const mode of modes.filter((m) => m !== 'npx')) {
        const env: NodeJS.ProcessEnv = { ...process.env };
        delete env.TETHER_SOURCE;
        if (mode === 'source') env.TETHER_SOURCE = '1';
        for (const cmd of [['--version'], ['help']]) (commands[`${mode}: tether ${cmd[0]}`] ??= []).push(timeCommand(cmd, env));
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const lines = [
    `tether serve, ${RUNS} runs each, RSS after ${IDLE_MS / 1000} s idle; Node ${process.version}, ${os.cpus().length} CPUs (${os.cpus()[0]?.model.trim()})`,
    '',
    '| mode | until "listening" ms | until dashboard ms | idle RSS MB | SIGTERM to exit ms |',
    '| --- | --- | --- | --- | --- |',
    ...modes.map(
      (m) =>
        `| ${m} | ${fmt(runs[m].map((r) => r.listenMs))} | ${fmt(runs[m].map((r) => r.readyMs))} | ${fmt(runs[m].map((r) => r.rssMb), 1)} | ${fmt(runs[m].map((r) => r.stopMs))} |`,
    ),
    '',
    '| command | wall ms |',
    '| --- | --- |',
    ...Object.entries(commands).map(([c, xs]) => `| ${c} | ${fmt(xs)} |`),
  ];
  process.stdout.write(lines.join('\n') + '\n');
  fs.mkdirSync(RESULTS, { recursive: true });
  fs.writeFileSync(path.join(RESULTS, 'startup.json'), JSON.stringify({ node: process.version, runs, commands }, null, 2));
}

main().catch((e) => {
  process.stderr.write(`bench:startup: ${(e as Error).message}\n`);
  process.exit(1);
});
