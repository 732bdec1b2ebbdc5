/**
 * `tether serve` as a user runs it: a child process with a config file in a
 * temporary folder, real ports. Collects its output so tests can assert on logs.
 */
import type { ExecutionContext } from 'ava';
import { ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { eventually } from './wait';

const ROOT = path.join(__dirname, '..', '..');
const BIN = path.join(ROOT, 'bin', 'tether.js');

/** A port that was free a moment ago (the OS picks it). */
export function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

export interface Served {
  proc: ChildProcess;
  port: number;
  httpPort: number;
  /** Everything it printed so far (stdout and stderr). */
  output(): string;
  /** Resolves with the exit code when it exits. */
  exited: Promise<number | null>;
  alive(): boolean;
  api(p: string): Promise<any>;
}

/** Starts `tether serve` with `config` (host, port and http filled in) and waits until it listens. */
export async function serve(t: ExecutionContext, config: Record<string, unknown>, env: Record<string, string> = {}): Promise<Served> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-serve-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'tether.json');
  const full = { host: '127.0.0.1', port: await freePort(), log: { level: 'info', format: 'pretty' }, http: { host: '127.0.0.1', port: await freePort() }, ...config };
  const port = full.port as number;
  const httpPort = (full.http as { port?: number } | null)?.port ?? 0;
  fs.writeFileSync(file, JSON.stringify(full));
  const proc = spawn(process.execPath, [BIN, 'serve', '--config', file], { cwd: ROOT, env: { ...process.env, ...env } });
  let out = '';
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (out += d));
  let code: number | null | undefined;
  const exited = new Promise<number | null>((r) =>
    proc.once('exit', (c) => {
      code = c;
      r(c);
    }),
  );
  t.teardown(() => {
    if (code === undefined) proc.kill('SIGKILL');
  });
  // A test that times out never runs its teardown: the server must not outlive the test process.
  const reap = () => {
    if (code === undefined) proc.kill('SIGKILL');
  };
  process.once('exit', reap);
  void exited.then(() => process.off('exit', reap));
  await eventually(() => code !== undefined || out.includes('dashboard:') || (full.http === null && out.includes('listening')), 60_000, 'tether serve listens');
  if (code !== undefined) throw new Error(`tether serve exited with ${code}:\n${out}`);
  return {
    proc,
    port,
    httpPort,
    output: () => out,
    exited,
    alive: () => code === undefined,
    api: async (p: string) => {
      const r = await fetch(`http://127.0.0.1:${httpPort}${p}`);
      return r.headers.get('content-type')?.includes('json') ? r.json() : r.text();
    },
  };
}
