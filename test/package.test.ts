/**
 * The package as a user gets it: `npm pack` (which builds), the tarball installed globally into a
 * temporary prefix, and the installed `tether` run from another folder with no TypeScript anywhere
 * it can reach. Also: the unpacked package after `npm ci --omit=dev`, SIGTERM through `npx`, the
 * Node version check, and a production install in a clone without a build.
 *
 * Real parts: npm (the registry or its cache for the dependencies), real processes, real sockets
 * on 127.0.0.1.
 */
import test from 'ava';
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client, silentLogger } from '../src';
import { freePort } from './helpers/serve';
import { eventually, within } from './helpers/wait';

const ROOT = path.join(__dirname, '..');
const VERSION = (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
const TMP = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-package-'));
const PREFIX = path.join(TMP, 'prefix');
const INSTALLED = path.join(PREFIX, 'lib', 'node_modules', 'tether');
const TETHER = path.join(PREFIX, 'bin', 'tether');

/** The environment of a user's shell: none of the test runner's npm or TETHER_SOURCE variables. */
function userEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!/^(npm_|TETHER_|TS_NODE_|NODE_OPTIONS$|INIT_CWD$)/i.test(k)) env[k] = v;
  return { ...env, ...extra };
}

interface Ran {
  code: number | null;
  out: string;
  err: string;
}

function run(file: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeout?: number } = {}): Promise<Ran> {
  return new Promise((resolve) => {
    execFile(
      file,
      args,
      { cwd: opts.cwd ?? TMP, env: opts.env ?? userEnv(), timeout: opts.timeout ?? 60_000, maxBuffer: 16 << 20 },
      (e, out, err) => resolve({ code: e ? ((e as { code?: number }).code ?? null) : 0, out, err }),
    );
  });
}

const npm = (args: string[], cwd: string) => run('npm', [...args, '--no-audit', '--no-fund', '--prefer-offline'], { cwd, timeout: 120_000 });

let tarball = '';

test.before(async () => {
  // npm pack runs prepack (a clean build) in the repository.
  const p = await npm(['pack', '--pack-destination', TMP], ROOT);
  if (p.code !== 0) throw new Error(`npm pack failed (${p.code}):\n${p.out}\n${p.err}`);
  tarball = path.join(TMP, p.out.trim().split('\n').pop()!);
  const i = await npm(['install', '-g', '--prefix', PREFIX, tarball], TMP);
  if (i.code !== 0) throw new Error(`npm install -g --prefix ${PREFIX} failed (${i.code}):\n${i.out}\n${i.err}`);
});

test.after.always(() => fs.rmSync(TMP, { recursive: true, force: true }));

test.serial('the tarball carries the build, the CLI, the examples and the board client, and no sources, tests or stray files', (t) => {
  const list = fs.readdirSync(INSTALLED).sort();
  t.deepEqual(list.filter((f) => f !== 'node_modules'), ['README.md', 'bin', 'clients', 'dist', 'examples', 'package.json', 'scripts']);
  for (const f of ['dist/src/index.js', 'dist/src/index.d.ts', 'dist/src/cli.js', 'dist/dashboard/index.html', 'dist/examples/data-types.json', 'dist/examples/json-exchange.js', 'bin/tether.js', 'bin/node-version.js', 'clients/micropython/tether_client.py']) {
    t.true(fs.existsSync(path.join(INSTALLED, f)), f);
  }
  for (const f of ['.tsbuildinfo', '.built']) t.false(fs.existsSync(path.join(INSTALLED, 'dist', f)), `no build state (${f})`);
  t.deepEqual(fs.readdirSync(path.join(INSTALLED, 'scripts')), ['build.js']);
  const pkg = JSON.parse(fs.readFileSync(path.join(INSTALLED, 'package.json'), 'utf8'));
  t.is(pkg.private, undefined);
  t.is(pkg.main, 'dist/src/index.js');
  t.is(pkg.types, 'dist/src/index.d.ts');
  t.is(pkg.engines.node, '>=20.19');
  // Production dependencies only: nothing that could load TypeScript.
  for (const dev of ['ts-node', 'typescript', 'ava']) {
    t.false(fs.existsSync(path.join(INSTALLED, 'node_modules', dev)), `${dev} is not installed`);
    t.throws(() => require.resolve(dev, { paths: [INSTALLED] }), undefined, `${dev} cannot be found from the package`);
  }
});

test.serial('installed globally: tether --version and tether help run compiled code from another folder', async (t) => {
  const v = await run(TETHER, ['--version']);
  t.is(v.code, 0, v.err);
  t.is(v.out.trim(), VERSION);
  const h = await run(TETHER, ['help']);
  t.is(h.code, 0, h.err);
  t.regex(h.out, /usage: tether <command>/);
  t.regex(h.out, /serve /);
  // The library entry, as `require('tether')` finds it through the exports map.
  const lib = await run(process.execPath, ['-e', "const t = require('tether'); console.log(typeof t.Server, typeof t.Client, Object.keys(require.cache).some((f) => /typescript|ts-node/.test(f)))"], {
    env: userEnv({ NODE_PATH: path.dirname(INSTALLED) }),
  });
  t.is(lib.code, 0, lib.err);
  t.is(lib.out.trim(), 'function function false');
});

test.serial('installed globally: tether init and tether serve in another folder; a Node client links up and its app answers; SIGTERM stops it', async (t) => {
  const dir = fs.mkdtempSync(path.join(TMP, 'site-'));
  const port = await freePort();
  const httpPort = await freePort();
  // The starter config of `tether init` (all interfaces, a journal, the dashboard on 127.0.0.1),
  // with free ports and the loopback address given on the command line.
  const init = await run(TETHER, ['init'], { cwd: dir });
  t.is(init.code, 0, init.out + init.err);
  t.true(fs.existsSync(path.join(dir, 'tether.json')));
  // A compiled JavaScript app next to the config, as `tsc` would emit it.
  fs.writeFileSync(
    path.join(dir, 'echo.js'),
    '"use strict";\nObject.defineProperty(exports, "__esModule", { value: true });\nexports.clients = ["pkg-1"];\n' +
      'exports.default = async function (conn) { for await (const line of conn) await conn.write("echo " + line.trimEnd()); };\n',
  );
  const srv = spawn(TETHER, ['serve', '--host', '127.0.0.1', '--port', String(port), '--http-port', String(httpPort), '--app', 'echo.js'], { cwd: dir, env: userEnv() });
  t.teardown(() => {
    if (srv.exitCode === null) srv.kill('SIGKILL');
  });
  let out = '';
  srv.stdout!.on('data', (d) => (out += d));
  srv.stderr!.on('data', (d) => (out += d));
  const exited = new Promise<number | null>((r) => srv.once('exit', (c) => r(c)));
  await eventually(() => out.includes('dashboard:') || srv.exitCode !== null, 30_000, 'the installed tether serve listens');
  t.is(srv.exitCode, null, out);
  const client = new Client({ id: 'pkg-1', host: '127.0.0.1', port, timeout: 2000, logger: silentLogger });
  t.teardown(() => client.close());
  await within(client.connect(), 10_000, 'the client links up');
  t.true(client.status());
  await within(client.write('hello'), 10_000, 'the server ACKs the line');
  t.is((await within(client.readline(), 10_000, 'the app answers')).trimEnd(), 'echo hello');
  const page = await fetch(`http://127.0.0.1:${httpPort}/`);
  t.is(page.status, 200, 'the dashboard is served from the package');
  t.regex(await page.text(), /<html/i);
  client.close();
  srv.kill('SIGTERM');
  t.is(await within(exited, 15_000, 'tether serve exits after SIGTERM'), 0, out);
});

test.serial('installed: a TypeScript app loads through ts-node when the app has it, and is refused with what to install when not', async (t) => {
  const dir = fs.mkdtempSync(path.join(TMP, 'ts-app-'));
  fs.writeFileSync(path.join(dir, 'app.ts'), "export const clients: string[] = ['ts-1'];\nexport default async function (conn: AsyncIterable<string>): Promise<void> {\n  for await (const line of conn) void line;\n}\n");
  const port = String(await freePort());
  const refused = await run(TETHER, ['serve', '--port', port, '--http-port', '0', '--app', 'app.ts'], { cwd: dir });
  t.is(refused.code, 1);
  t.regex(refused.err, /app app\.ts is TypeScript, .*npm install --save-dev ts-node typescript@5/);
  t.notRegex(refused.err, /Require stack|\n.+\n/, 'one line');
  // The user installs ts-node and TypeScript for the app (here: linked from this repository).
  fs.mkdirSync(path.join(dir, 'node_modules'));
  for (const m of ['ts-node', 'typescript']) fs.symlinkSync(path.join(ROOT, 'node_modules', m), path.join(dir, 'node_modules', m), 'dir');
  const loaded = await run(TETHER, ['serve', '--port', port, '--http-port', '0', '--app', 'app.ts', '--duration', '1'], { cwd: dir });
  t.is(loaded.code, 0, loaded.out + loaded.err);
  t.regex(loaded.out, /listening/);
});

test.serial('SIGTERM to `npx tether serve` (npm, not tether) stops tether too and frees its ports', async (t) => {
  const dir = fs.mkdtempSync(path.join(TMP, 'npx-'));
  const port = await freePort();
  const httpPort = await freePort();
  fs.writeFileSync(path.join(dir, 'site.json'), JSON.stringify({ host: '127.0.0.1', port, http: { host: '127.0.0.1', port: httpPort } }));
  // Output to a file, which outlives npm (a pipe from npm could close under tether when npm goes).
  const log = path.join(dir, 'out.log');
  const fd = fs.openSync(log, 'w');
  // npx finds tether in the global prefix; npm runs it through `sh -c`.
  const npx = spawn('npx', ['--no-install', 'tether', 'serve', '--config', 'site.json'], {
    cwd: dir,
    env: userEnv({ npm_config_prefix: PREFIX }),
    detached: true,
    stdio: ['ignore', fd, fd],
  });
  fs.closeSync(fd);
  const out = () => fs.readFileSync(log, 'utf8');
  t.teardown(() => {
    try {
      process.kill(-npx.pid!, 'SIGKILL');
    } catch {
      /* gone */
    }
  });
  await eventually(() => out().includes('dashboard:') || npx.exitCode !== null, 30_000, 'npx tether serve listens');
  t.is(npx.exitCode, null, out());
  npx.kill('SIGTERM'); // to npm only, as a service manager or `kill PID` does
  await eventually(async () => !(await accepts(port)) && !(await accepts(httpPort)), 15_000, 'tether to stop and free its ports');
  // It stopped as on SIGTERM (its shutdown ran), not by a crash.
  await eventually(() => /server closed/.test(out()), 5000, 'the shutdown to finish');
  t.regex(out(), /npm, which started this process, has gone away: stopping/);
  t.notRegex(out(), /Error|EPIPE/);
});

test.serial('started through npm, with its output piped to npm: when npm dies, tether stops instead of running on (or spinning on EPIPE)', async (t) => {
  const port = await freePort();
  const httpPort = await freePort();
  // A stand-in for npm: starts tether with pipes for its output, reports the PID, and dies at once.
  const script =
    "const c = require('node:child_process').spawn(process.argv[1], ['serve', '--port', process.argv[2], '--http-port', process.argv[3]], { env: { ...process.env, npm_lifecycle_event: 'start' } });" +
    "let out = ''; c.stdout.on('data', (d) => { out += d; if (out.includes('dashboard:')) { console.log(c.pid); process.exit(0); } });" +
    "setTimeout(() => { console.error(out); process.exit(1); }, 30000);";
  const r = await run(process.execPath, ['-e', script, TETHER, String(port), String(httpPort)], { cwd: TMP });
  t.is(r.code, 0, r.err);
  const pid = Number(r.out.trim());
  t.teardown(() => {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  });
  await eventually(() => !fs.existsSync(`/proc/${pid}`) || /^State:\s+Z/m.test(fs.readFileSync(`/proc/${pid}/status`, 'utf8')), 15_000, 'the orphaned tether to exit');
  t.false(await accepts(port));
  t.false(await accepts(httpPort));
});

/** True when something accepts TCP connections on 127.0.0.1:port. */
function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.once('connect', () => (s.destroy(), resolve(true)));
    s.once('error', () => resolve(false));
  });
}

test.serial('npm ci --omit=dev in the unpacked package: the CLI runs without development dependencies', async (t) => {
  const dir = fs.mkdtempSync(path.join(TMP, 'prod-'));
  const x = await run('tar', ['xzf', tarball, '-C', dir]);
  t.is(x.code, 0, x.err);
  const pkg = path.join(dir, 'package');
  fs.copyFileSync(path.join(ROOT, 'package-lock.json'), path.join(pkg, 'package-lock.json'));
  const ci = await npm(['ci', '--omit=dev'], pkg);
  t.is(ci.code, 0, ci.out + ci.err);
  for (const dev of ['ts-node', 'typescript']) t.false(fs.existsSync(path.join(pkg, 'node_modules', dev)), dev);
  const v = await run(process.execPath, [path.join(pkg, 'bin', 'tether.js'), '--version']);
  t.is(v.code, 0, v.err);
  t.is(v.out.trim(), VERSION);
  const s = await run(process.execPath, [path.join(pkg, 'bin', 'tether.js'), 'serve', '--port', String(await freePort()), '--http-port', '0', '--duration', '1'], { cwd: dir });
  t.is(s.code, 0, s.out + s.err);
  t.regex(s.out, /listening/);
});

test.serial('a Node.js older than 20.19 is told what to install, before anything loads', async (t) => {
  // Pretend to be Node 18 by rewriting process.versions.node before bin/tether.js runs.
  const fake = path.join(TMP, 'node18.js');
  fs.writeFileSync(fake, "Object.defineProperty(process.versions, 'node', { value: '18.19.1' });\n");
  const r = await run(process.execPath, ['-r', fake, path.join(INSTALLED, 'bin', 'tether.js'), 'serve']);
  t.is(r.code, 1);
  t.regex(r.err, /^tether needs Node\.js 20\.19 or newer; this is Node\.js 18\.19\.1\./);
  t.regex(r.err, /NodeSource/);
  t.regex(r.err, /nvm/);
  t.is(r.out, '', 'nothing ran');
  const check = require(path.join(ROOT, 'bin', 'node-version.js')) as { tooOld(v: string): boolean };
  for (const old of ['18.19.1', 'v20.18.3', '19.9.0', '12.0.0']) t.true(check.tooOld(old), old);
  for (const ok of ['20.19.0', 'v20.20.2', '22.0.0', '24.1.0']) t.false(check.tooOld(ok), ok);
});

test.serial('a production install in a clone without a build says how to get one', async (t) => {
  // The repository's build script in a clone whose node_modules lacks TypeScript and dist/ is absent.
  const dir = fs.mkdtempSync(path.join(TMP, 'clone-'));
  fs.mkdirSync(path.join(dir, 'scripts'));
  fs.mkdirSync(path.join(dir, 'src'));
  fs.copyFileSync(path.join(ROOT, 'scripts', 'build.js'), path.join(dir, 'scripts', 'build.js'));
  fs.copyFileSync(path.join(ROOT, 'tsconfig.build.json'), path.join(dir, 'tsconfig.build.json'));
  const r = await run(process.execPath, [path.join(dir, 'scripts', 'build.js')], { cwd: dir, env: userEnv({ npm_lifecycle_event: 'prepare' }) });
  t.is(r.code, 1);
  t.regex(r.err, /TypeScript is not installed .*npm ci/);
  // And bin/tether.js without a build says to build.
  fs.mkdirSync(path.join(dir, 'bin'));
  for (const f of ['tether.js', 'node-version.js']) fs.copyFileSync(path.join(ROOT, 'bin', f), path.join(dir, 'bin', f));
  const b = await run(process.execPath, [path.join(dir, 'bin', 'tether.js'), 'help']);
  t.is(b.code, 1);
  t.regex(b.err, /the compiled code is missing .*npm run build/s);
});
