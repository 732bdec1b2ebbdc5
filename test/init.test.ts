/**
 * "Your own fleet in two commands" (issue 16 item 2): `tether init` writes a
 * starter config and apps/, and `tether serve` run in that folder picks it up,
 * without --config. Real processes, a real board client on 127.0.0.1.
 */
import test, { ExecutionContext } from 'ava';
import { ChildProcess, execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client, silentLogger } from '../src';
import { loadConfig } from '../src/config';
import { lanAddresses } from '../src/init';
import { eventually } from './helpers/wait';

const ROOT = path.join(__dirname, '..');
const BIN = path.join(ROOT, 'bin', 'tether.js');

function tmpDir(t: ExecutionContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-init-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function cli(args: string[], cwd: string): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { cwd, timeout: 60_000 }, (e, out, err) =>
      resolve({ code: e ? ((e as { code?: number }).code ?? null) : 0, out, err }),
    );
  });
}

/** `tether serve ARGS` in `cwd`, until it has logged its dashboard line (or exited). */
async function startServe(t: ExecutionContext, cwd: string, args: string[]): Promise<{ proc: ChildProcess; output: () => string; port: number; exited: Promise<number | null> }> {
  const proc = spawn(process.execPath, [BIN, 'serve', ...args], { cwd });
  let out = '';
  let code: number | null | undefined;
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (out += d));
  const exited = new Promise<number | null>((r) => proc.once('exit', (c) => r((code = c))));
  t.teardown(() => {
    if (code === undefined) proc.kill('SIGKILL');
  });
  await eventually(() => code !== undefined || out.includes('dashboard:'), 60_000, 'tether serve to start');
  if (code !== undefined) throw new Error(`tether serve exited with ${code}:\n${out}`);
  const port = Number(/listening host=\S+ port=(\d+)/.exec(out)?.[1]);
  return { proc, output: () => out, port, exited };
}

test('tether init writes a starter config for a real fleet and apps/, and says what to do next', async (t) => {
  const dir = tmpDir(t);
  const r = await cli(['init', 'fleet'], dir);
  t.is(r.code, 0, r.err);
  const file = path.join(dir, 'fleet', 'tether.json');
  t.regex(r.out, new RegExp(`wrote ${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
  t.regex(r.out, /point your boards at .*port 8123/);
  t.regex(r.out, /tether serve --config /);
  // Plain JSON that the loader takes as it is; the notes are "$" keys.
  const raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  t.true(Object.keys(raw).some((k) => k.startsWith('$')), 'it carries notes');
  const cfg = loadConfig(file);
  t.is(cfg.host, '0.0.0.0', 'listens on every interface: boards on the LAN can reach it');
  t.is(cfg.port, 8123);
  t.deepEqual(cfg.apps, [], 'no demo apps');
  t.deepEqual(cfg.clients, []);
  t.deepEqual(cfg.auth?.devices, {}, 'auth is there, ready to switch on');
  t.is(cfg.auth?.required, false, 'and lets every board in until it is switched on');
  t.is(cfg.persist, 'journal');
  t.deepEqual(cfg.http && { host: cfg.http.host, token: cfg.http.token }, { host: '127.0.0.1', token: null }, 'the dashboard stays on this machine');
  t.regex(raw.$http, /token/, 'with a note on the token');
  t.true(fs.statSync(path.join(dir, 'fleet', 'apps')).isDirectory());
  t.regex(fs.readFileSync(path.join(dir, 'fleet', 'apps', 'hello.js'), 'utf8'), /module\.exports = async function hello/);
  t.is(fs.statSync(file).mode & 0o777, 0o600, 'the config may hold the HTTP token: only its owner reads it');
});

test('tether init refuses to replace a config; --force replaces it and keeps the apps', async (t) => {
  const dir = tmpDir(t);
  t.is((await cli(['init'], dir)).code, 0);
  const file = path.join(dir, 'tether.json');
  const hello = path.join(dir, 'apps', 'hello.js');
  fs.writeFileSync(file, '{ "port": 9999 }\n');
  fs.writeFileSync(hello, '// my own app now\n');
  const again = await cli(['init'], dir);
  t.is(again.code, 1);
  t.regex(again.err, /tether\.json exists already: edit it, or run `tether init --force`/);
  t.is(fs.readFileSync(file, 'utf8'), '{ "port": 9999 }\n', 'untouched');
  const forced = await cli(['init', '--force'], dir);
  t.is(forced.code, 0, forced.err);
  t.is(loadConfig(file).port, 8123, 'replaced');
  t.is(fs.readFileSync(hello, 'utf8'), '// my own app now\n', 'an app is never overwritten');
  t.regex(forced.out, /kept +.*hello\.js/);
  const two = await cli(['init', 'a', 'b'], dir);
  t.is(two.code, 2);
  t.regex(two.err, /tether init: takes one folder/);
});

test('two commands: tether init, then tether serve in that folder serves a board with the example app', async (t) => {
  const dir = tmpDir(t);
  t.is((await cli(['init'], dir)).code, 0);
  // Bind the example app: the config is plain JSON, so any tool can edit it.
  const file = path.join(dir, 'tether.json');
  const raw = JSON.parse(fs.readFileSync(file, 'utf8'));
  raw.apps = [{ script: 'apps/hello.js', clients: '*' }];
  fs.writeFileSync(file, JSON.stringify(raw, null, 2));
  // No --config: ./tether.json is found. Ports 0: tests run side by side.
  const s = await startServe(t, dir, ['--port', '0', '--http-port', '0']);
  const out = s.output();
  t.regex(out, /listening host=0\.0\.0\.0/);
  const lan = lanAddresses();
  if (lan.length > 0) {
    for (const a of lan) t.true(out.includes(`${a.address}:${s.port}`), `the log names ${a.address}:${s.port} for the boards:\n${out}`);
  } else {
    t.regex(out, /no LAN address now/);
  }
  t.regex(out, /the dashboard is on this machine only .*ssh -L/);
  t.notRegex(out, /=undefined/, 'no field without a value in the pretty log');

  const board = new Client({ id: 'board-1', host: '127.0.0.1', port: s.port, timeout: 2000, logger: silentLogger });
  t.teardown(() => board.close());
  await board.connect();
  await board.write('hi there');
  t.deepEqual(JSON.parse(await board.readline()), { echo: 'hi there' }, 'apps/hello.js answered');
  await eventually(() => s.output().includes('hello: board says'), 10_000, 'the app to log the line');
  t.true(fs.existsSync(path.join(dir, 'journal')), 'the journal folder is next to the config');
  s.proc.kill('SIGTERM');
  t.is(await s.exited, 0);
});

test('tether serve without a config: built-in defaults, and a stray ./local.json is named', async (t) => {
  const dir = tmpDir(t);
  fs.writeFileSync(path.join(dir, 'local.json'), '{ "port": 1 }');
  const s = await startServe(t, dir, ['--port', '0', '--http-port', '0', '--host', '127.0.0.1']);
  t.regex(s.output(), /\.\/local\.json is not read by default: the config file tether serve looks for is \.\/tether\.json .*rename it to tether\.json, or pass --config local\.json/);
  s.proc.kill('SIGTERM');
  t.is(await s.exited, 0);
});
