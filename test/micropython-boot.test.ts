/**
 * The board side of a real installation (issue 16 item 4), in the real MicroPython
 * WebAssembly interpreter: the mip package (clients/micropython/package.json) installs a
 * client that imports; the freezing manifest names files that exist; and the boot recipe
 * (clients/micropython/examples/main.py) starts the client with the watchdog from
 * local.json against a real `tether serve` with device secrets, runs the app, and resets
 * the board when the app fails.
 */
import test, { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { generateSecret, hashSecret } from '../src/auth';
import { startMicroPython, MicroPython } from './helpers/micropython';
import { serve } from './helpers/serve';
import { eventually } from './helpers/wait';

const CLIENT_DIR = path.join(__dirname, '..', 'clients', 'micropython');
const MIP_PREFIXES = ['http://', 'https://', 'github:', 'gitlab:'];

async function board(t: ExecutionContext, opts: Parameters<typeof startMicroPython>[0] = {}): Promise<MicroPython> {
  const mp = await startMicroPython(opts);
  t.teardown(() => mp.close());
  return mp;
}

interface MipPackage {
  urls: Array<[string, string]>;
  deps?: Array<[string, string]>;
  version: string;
}

/**
 * What mip (on the board) and mpremote mip do with a package.json's "urls": a source
 * without a URL scheme is relative to the package.json's own location; each file lands
 * at <target>/<dest>, the target being the first sys.path entry ending in /lib.
 */
function mipFiles(pkgDir: string, pkg: MipPackage): Record<string, string> {
  const files: Record<string, string> = {};
  for (const [dest, src] of pkg.urls) files[`/lib/${dest}`] = fs.readFileSync(path.join(pkgDir, src), 'utf8');
  return files;
}

test('mip package.json: the documented shape, every source exists beside it, and the installed client imports', async (t) => {
  const text = fs.readFileSync(path.join(CLIENT_DIR, 'package.json'), 'utf8');
  const pkg = JSON.parse(text) as MipPackage;
  t.deepEqual(Object.keys(pkg).sort(), ['deps', 'urls', 'version']);
  t.regex(pkg.version, /^\d+\.\d+\.\d+$/);
  t.deepEqual(pkg.deps, [], 'needs nothing beyond the firmware (asyncio is built in since 1.20)');
  t.true(Array.isArray(pkg.urls) && pkg.urls.length > 0);
  for (const entry of pkg.urls) {
    t.true(Array.isArray(entry) && entry.length === 2 && entry.every((s) => typeof s === 'string'), JSON.stringify(entry));
    const [dest, src] = entry;
    t.false(dest.startsWith('/') || dest.split('/').includes('..'), `${dest}: a path under the target`);
    t.false(MIP_PREFIXES.some((p) => src.startsWith(p)), `${src}: relative, so a fork or a local clone installs its own copy`);
    t.true(fs.statSync(path.join(CLIENT_DIR, src)).isFile(), `${src} exists`);
  }
  t.true(pkg.urls.some(([dest]) => dest === 'tether_client.py'));

  // Installed as mip lays it out, into an interpreter that has no other copy of the client.
  const mp = await board(t, { clientDir: null, files: mipFiles(CLIENT_DIR, pkg) });
  await mp.run(`
import sys
lib = [p for p in sys.path if p.endswith('/lib')][0]   # where mip installs
import tether_client
`);
  const got = await mp.eval(`[lib, tether_client.__file__, hasattr(tether_client, 'Client'), tether_client.Client.from_config.__name__]`);
  t.deepEqual(got, ['/lib', '/lib/tether_client.py', true, 'from_config']);
});

test('freezing manifest: include/module calls that the MicroPython build understands, naming files that exist', async (t) => {
  const manifest = fs.readFileSync(path.join(CLIENT_DIR, 'manifest.py'), 'utf8');
  // The manifest is Python; run it in the interpreter with the build's functions recorded.
  const mp = await board(t, { clientDir: null });
  await mp.run(`
calls = []
def include(p, **kw): calls.append(['include', p, kw.get('base_path', '.')])
def module(p, base_path='.', **kw): calls.append(['module', p, base_path])
def package(p, files=None, base_path='.', **kw): calls.append(['package', p, base_path])
def require(p, **kw): calls.append(['require', p, '.'])
def freeze(p, script=None, **kw): calls.append(['freeze', p, '.'])
def metadata(**kw): pass
exec(${JSON.stringify(manifest)}, {'include': include, 'module': module, 'package': package, 'require': require, 'freeze': freeze, 'metadata': metadata})
`);
  const calls = (await mp.eval('calls')) as Array<[string, string, string]>;
  t.deepEqual(calls[0], ['include', '$(BOARD_DIR)/manifest.py', '.'], 'keeps what the board freezes already');
  const modules = calls.filter(([kind]) => kind === 'module');
  t.deepEqual(modules.map(([, p]) => p), ['tether_client.py']);
  for (const [, p, base] of modules) t.true(fs.existsSync(path.join(CLIENT_DIR, base, p)), `${p} exists relative to the manifest`);
  // The commented example names a real file too.
  const optional = /# module\("([^"]+)", base_path="([^"]+)"\)/.exec(manifest);
  t.truthy(optional);
  t.true(fs.existsSync(path.join(CLIENT_DIR, optional![2], optional![1])));
});

/** A `tether serve` with device secrets and the JSON example app bound to `id`. */
async function server(t: ExecutionContext, id: string) {
  const secret = generateSecret();
  const s = await serve(
    t,
    {
      timeout: 1000,
      auth: { devices: { [id]: hashSecret(secret) } },
      apps: [{ script: path.join(__dirname, '..', 'examples', 'json-exchange.ts'), clients: [id] }],
    },
    { TETHER_SOURCE: '1' },
  );
  return { s, idLine: `${id}@${secret}`, secret };
}

/** Starts main.py's main() as the board would at boot (the grace period and asyncio.run are the board's part). */
async function boot(mp: MicroPython, setup = ''): Promise<void> {
  await mp.run(`
import os, sys, asyncio
os.chdir('/')
sys.path.append('/lib/examples')
${setup}
import main
asyncio.create_task(main.main('local.json'))
`);
}

test('main.py at boot: settings from local.json, the watchdog on, the app talking to a real tether serve with its secret', async (t) => {
  const { s, idLine, secret } = await server(t, 'lamp-1');
  const port = s.port;
  const mp = await board(t, {
    files: { '/local.json': JSON.stringify({ id: idLine, server: '127.0.0.1', port, timeout: 1000, app: 'json_exchange', grace: 0 }) },
  });
  await boot(mp, 'import json_exchange\njson_exchange.PERIOD_MS = 200');
  const hello = await mp.waitForLine(/^tether: board /, 20_000);
  t.is(hello, `tether: board lamp-1 server ('127.0.0.1', ${port}) app json_exchange watchdog on`);
  t.false(mp.stdout.join('\n').includes(secret), 'the secret is never printed');
  // The board's app reaches its server half, and the server half's answers reach the board.
  await eventually(() => (s.output().match(/app got .*from=lamp-1 /g) ?? []).length >= 3, 30_000, 'three reports at the server');
  await mp.waitForLine(/^got \[0, /, 20_000);
  t.is(mp.wdtTimeoutMs, 20000, 'the watchdog was started (ESP32 timeout)');
  const fed = mp.wdtFeeds.length;
  await eventually(() => mp.wdtFeeds.length > fed + 5, 10_000, 'the client keeps feeding it');
  t.deepEqual(mp.resets, []);
  t.true(s.output().includes('link up client=lamp-1'));
});

test('main.py: an app that fails is reported with its traceback and the board is reset', async (t) => {
  const { s, idLine } = await server(t, 'lamp-2');
  const mp = await board(t, {
    files: {
      '/local.json': JSON.stringify({ id: idLine, server: '127.0.0.1', port: s.port, timeout: 1000, app: 'flaky_app', restart_after: 0.2, grace: 0 }),
      'flaky_app.py': `
async def main(client):
    await client
    await client.write('["about to fail"]')
    raise OSError(5, 'sensor unplugged')
`,
    },
  });
  await boot(mp);
  await mp.waitForLine('tether: the app failed:', 20_000);
  await eventually(() => mp.resets.includes('reset'), 10_000, 'machine.reset()');
  t.true(mp.stdout.some((l) => l.includes('sensor unplugged')), 'the traceback names the error');
  t.true(mp.stdout.some((l) => l.includes('flaky_app.py')), 'and where it came from');
  t.truthy(mp.wdtTimeoutMs, 'the watchdog was running meanwhile');
});

test('main.py: setup mistakes stop at the REPL with a message that says what to do, without the watchdog', async (t) => {
  const cases: Array<[Record<string, string>, RegExp]> = [
    [{}, /^main\.py: no local\.json on the board: copy local\.example\.json there as local\.json and fill it in$/],
    [{ '/local.json': '{"id": "lamp-1", ' }, /^main\.py: local\.json is not valid JSON \(.*\): fix it \(mpremote edit :local\.json\)$/],
    [{ '/local.json': '{"id": "lamp-1"}' }, /^main\.py: local\.json needs at least "id" and "server" \(see local\.example\.json\)$/],
    [{ '/local.json': '{"id": "lamp-1", "server": "127.0.0.1", "app": "no_such_app"}' }, /^main\.py: cannot import the app module "no_such_app" \(.*\): copy no_such_app\.py to the board, or name another in "app"$/],
    [{ '/local.json': '{"id": "lamp-1", "server": "127.0.0.1", "app": "json"}' }, /^main\.py: the app module "json" has no main\(client\): add {2}async def main\(client\): \.\.\.$/],
    [{ '/local.json': '{"id": "lamp-1", "server": ["127.0.0.1", 8123, 1], "app": "json_exchange"}' }, /^main\.py: local\.json: server: a host, or a list of hosts and \(host, port\) pairs$/],
  ];
  for (const [files, want] of cases) {
    const mp = await board(t, { files });
    // run() is what the board calls; without the grace wait here (it would block the interpreter).
    await mp.run(`
import os, sys
os.chdir('/')
sys.path.append('/lib/examples')
import main
main.GRACE = 0
main.run()
`);
    const line = mp.stdout.find((l) => l.startsWith('main.py: '));
    t.regex(line ?? '(nothing printed)', want);
    t.is(mp.wdtTimeoutMs, null, 'no watchdog: the REPL stays usable');
    t.deepEqual(mp.resets, []);
    await mp.close();
  }
});
