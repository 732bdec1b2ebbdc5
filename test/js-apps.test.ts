/**
 * App scripts in plain JavaScript (issue 16 item 5), run by real `tether serve`
 * processes with real device clients on 127.0.0.1: `module.exports = fn`,
 * `module.exports = { default, clients }`, `exports.default = fn` and an ES
 * module `.mjs`. And what a newcomer sees when an app cannot be loaded: one line
 * that says what to fix, never Node's require stack.
 */
import test, { ExecutionContext } from 'ava';
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client, silentLogger } from '../src';
import { loadApp } from '../src/apps';
import { freePort, serve } from './helpers/serve';
import { eventually } from './helpers/wait';

const ROOT = path.join(__dirname, '..');
const BIN = path.join(ROOT, 'bin', 'tether.js');
const FIX = path.join(__dirname, 'fixtures');

async function device(t: ExecutionContext, port: number, id: string): Promise<Client> {
  const c = new Client({ id, host: '127.0.0.1', port, timeout: 2000, logger: silentLogger });
  t.teardown(() => c.close());
  await c.connect();
  return c;
}

/** Runs the CLI to its end; the output of both streams. */
function cli(args: string[], cwd = ROOT): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { cwd, timeout: 60_000 }, (e, out, err) =>
      resolve({ code: e ? ((e as { code?: number }).code ?? null) : 0, out, err }),
    );
  });
}

function tmpDir(t: ExecutionContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-jsapps-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test('plain-JS apps in all four shapes serve their own client IDs in a real tether serve', async (t) => {
  const s = await serve(t, {
    apps: [
      { script: path.join(FIX, 'js-app-fn.js') },
      { script: path.join(FIX, 'js-app-object.js') },
      { script: path.join(FIX, 'js-app-exports.js') },
      { script: path.join(FIX, 'js-app.mjs') },
    ],
  });
  const expect: Array<[string, string]> = [
    ['js-fn', 'fn js-fn: hello\n'],
    ['js-object-1', 'object js-object-1: hello\n'],
    ['js-object-2', 'object js-object-2: hello\n'],
    ['js-exports', 'exports js-exports: hello\n'],
    ['js-esm', 'esm js-esm: hello\n'],
  ];
  for (const [id, reply] of expect) {
    const c = await device(t, s.port, id);
    await c.write('hello');
    t.is(await c.readline(), reply, `${id} is served by its app`);
  }
  // The clients each script exports are the ones it got: another ID has no app.
  t.notRegex(s.output(), /cannot load app|ERR_BAD_APP/);
  const stranger = await device(t, s.port, 'js-nobody');
  await stranger.write('anyone?');
  const info = await s.api('/api/devices/js-nobody');
  t.deepEqual(info.device.apps, []);
});

test('--app FILE=IDS binds a plain-JS app on the command line; a wrong --app path says which path', async (t) => {
  const port = await freePort();
  const proc = spawn(process.execPath, [BIN, 'serve', '--port', String(port), '--http-port', '0', '--app', 'test/fixtures/js-app-fn.js=cli-1'], { cwd: ROOT });
  const exited = new Promise<number | null>((r) => proc.once('exit', r));
  t.teardown(() => proc.kill('SIGKILL'));
  let out = '';
  proc.stdout.on('data', (d) => (out += d));
  proc.stderr.on('data', (d) => (out += d));
  await eventually(() => out.includes('listening') || proc.exitCode !== null, 60_000, 'tether serve listens');
  const c = await device(t, port, 'cli-1');
  await c.write('hi');
  t.is(await c.readline(), 'fn cli-1: hi\n');
  proc.kill('SIGTERM');
  await exited;
  t.notRegex(out, /cannot load app|ERR_BAD_APP/);

  const bad = await cli(['serve', '--port', '0', '--http-port', '0', '--app', 'test/fixtures/no-such-app.js=x']);
  t.is(bad.code, 1);
  t.is(
    bad.err.trim(),
    `tether: cannot find app script test/fixtures/no-such-app.js (resolved to ${path.join(ROOT, 'test/fixtures/no-such-app.js')}): check the path in apps[].script or --app`,
  );
  t.notRegex(bad.err + bad.out, /Require stack|node:internal|at Module\./);
});

test('a missing app script in the config: one clear line naming the script and where it was looked for, exit 1', async (t) => {
  const dir = tmpDir(t);
  const config = path.join(dir, 'tether.json');
  fs.writeFileSync(config, JSON.stringify({ host: '127.0.0.1', port: 0, http: null, apps: [{ script: 'apps/lamp.js', clients: '*' }] }));
  const r = await cli(['serve', '--config', config], dir);
  t.is(r.code, 1);
  const abs = path.join(dir, 'apps', 'lamp.js');
  t.regex(r.err, /^tether: cannot find app script /);
  t.true(r.err.includes(`(resolved to ${abs}): check the path in apps[].script or --app`), r.err);
  t.notRegex(r.err + r.out, /Require stack|node:internal|MODULE_NOT_FOUND/);
  t.is(r.err.trim().split('\n').length, 1, 'one line');
});

test('apps that cannot be loaded: each message says what to change', async (t) => {
  const dir = tmpDir(t);
  // A folder that says CommonJS, as most projects' package.json does.
  fs.writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ type: 'commonjs' }));
  const write = (name: string, text: string) => {
    fs.writeFileSync(path.join(dir, name), text);
    return path.join(dir, name);
  };
  const cases: Array<[string, string, RegExp]> = [
    ['no-fn.js', 'exports.handler = 1;\n', /exports no app function \(it exports handler\): give it a default export.*module\.exports = async function/],
    ['esm.js', 'export default async function (conn) {}\n', /is an ES module .* rename it to \.mjs, or use require\(\) and module\.exports/],
    ['tla.mjs', 'await Promise.resolve();\nexport default async function (conn) {}\n', /top-level await.*move the awaits into the app function/],
    ['needs.js', "require('tether-no-such-package');\nmodule.exports = async () => {};\n", /needs the package tether-no-such-package, which is not installed: run `npm install tether-no-such-package`/],
    ['rel.js', "require('./helpers/missing');\nmodule.exports = async () => {};\n", /requires \.\/helpers\/missing, which does not exist: fix that path in the app/],
    ['syntax.js', 'module.exports = async function (conn {\n', /SyntaxError: .*\(syntax\.js:1; `node --check .*syntax\.js` shows the line\): fix the app's syntax/],
    ['throws.js', "\n\nthrow new Error('no config for the lamps');\n", /it threw while loading \(throws\.js:3:7\): no config for the lamps: code at the top level/],
    ['clients.js', "module.exports = async () => {};\nmodule.exports.clients = 'lamp-1';\n", /"clients" export must be a list of client IDs or "\*", not "lamp-1"/],
  ];
  for (const [name, text, want] of cases) {
    const file = write(name, text);
    const e = t.throws(() => loadApp(file), undefined, name);
    t.is((e as { code?: string }).code, 'ERR_BAD_APP', name);
    t.regex(e!.message, want, name);
    t.notRegex(e!.message, /Require stack|\n/, `${name}: one line, no require stack`);
  }
  // Through the real CLI the same message is what the user reads.
  const r = await cli(['serve', '--port', '0', '--http-port', '0', '--app', `${path.join(dir, 'esm.js')}=x`]);
  t.is(r.code, 1);
  t.regex(r.err, /tether: cannot load app .*esm\.js: it is an ES module/);
});

test('a TypeScript app where no TypeScript loader is registered is refused with what to do instead', (t) => {
  const ext = require.extensions as Record<string, unknown>;
  const saved = ext['.ts'];
  delete ext['.ts'];
  try {
    const e = t.throws(() => loadApp(path.join(FIX, 'record-app.ts')));
    t.regex(e!.message, /is TypeScript, and this tether runs without a TypeScript loader: write the app in JavaScript/);
  } finally {
    ext['.ts'] = saved;
  }
  // With the loader (as in development and these tests) it loads as before.
  t.is(typeof loadApp(path.join(FIX, 'record-app.ts')).run, 'function');
});

test('loadApp: name, clients and device from a plain-JS app; --app IDs and a type override the script', (t) => {
  const fn = loadApp(path.join(FIX, 'js-app-fn.js'));
  t.is(fn.name, 'js-app-fn');
  t.deepEqual(fn.clients, ['js-fn']);
  const esm = loadApp(path.join(FIX, 'js-app.mjs'));
  t.is(esm.name, 'js-app');
  t.deepEqual(esm.clients, ['js-esm']);
  t.deepEqual(loadApp(path.join(FIX, 'js-app-object.js'), ['x']).clients, ['x']);
  const typed = loadApp(path.join(FIX, 'js-app-exports.js'), undefined, 'light');
  t.is(typed.type, 'light');
  t.is(typed.clients, '*');
});

test('docs/porting.md: the ported greenhouse app, exactly as printed, runs in a real tether serve', async (t) => {
  const doc = fs.readFileSync(path.join(ROOT, 'docs', 'porting.md'), 'utf8');
  const m = /<!-- porting-example: greenhouse\.js -->\n```js\n([\s\S]*?)\n```/.exec(doc);
  t.truthy(m, 'the example block is there');
  const dir = tmpDir(t);
  const script = path.join(dir, 'greenhouse.js');
  fs.writeFileSync(script, m![1]);
  const s = await serve(t, { clients: ['gh-1', 'gh-2'], apps: [{ script }] });
  const gh1 = await device(t, s.port, 'gh-1');
  const gh2 = await device(t, s.port, 'gh-2');
  await gh1.write(JSON.stringify({ temp: 15.5 }));
  t.deepEqual(JSON.parse(await gh1.readline()), { heater: 'on' });
  await gh2.write(JSON.stringify({ temp: 21 }));
  t.deepEqual(JSON.parse(await gh2.readline()), { heater: 'off' });
  await gh1.write('this is not JSON');
  await gh1.write(JSON.stringify({ temp: 19 }));
  t.deepEqual(JSON.parse(await gh1.readline()), { heater: 'off' }, 'a bad line is skipped, the app goes on');
  await eventually(() => /not JSON, skipped .*client=gh-1/.test(s.output()), 10_000, 'the bad line logged');
  // Every 10 s, without qos: how many reports this board has made so far (3 for gh-1, once all are in).
  let beat = JSON.parse(await gh1.readline()) as { reports: number };
  while (beat.reports < 3) beat = JSON.parse(await gh1.readline());
  t.deepEqual(beat, { reports: 3 });
  t.notRegex(s.output(), /app failed|threw/);
});
