/**
 * The `tether` command as a newcomer runs it: a child process, real sockets.
 */
import test from 'ava';
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client, Server, silentLogger } from '../src';
import { eventually } from './helpers/wait';

const BIN = path.join(__dirname, '..', 'bin', 'tether.js');

/** A port that was free a moment ago (the OS picks it). */
function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

function run(args: string[], timeoutMs = 60_000): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { timeout: timeoutMs, cwd: path.join(__dirname, '..') }, (e, out, err) =>
      resolve({ code: e ? ((e as { code?: number }).code ?? null) : 0, out, err }),
    );
  });
}

test('demo --verbose: apps and simulated devices exchange messages, an outage heals, it exits cleanly', async (t) => {
  // --verbose: the apps' and the devices' own lines are what this test looks at (quiet by default since
  // issue 16); 20 s: a staged outage waits for a message to the device, then lasts timeout + reconnectDelay.
  const r = await run(['demo', '--port', '0', '--http-port', '0', '--duration', '20', '--outage-every', '3', '--verbose'], 110_000);
  t.is(r.code, 0, r.err);
  t.regex(r.out, /dashboard: http:\/\/127\.0\.0\.1:\d+\//, 'the demo logs where the dashboard is');
  t.regex(r.out, /HTTP API closed/, 'and closes it at the end');
  t.regex(r.out, /app got .*from=1/, 'the server app hears device 1');
  t.regex(r.out, /device got .*device=2/, 'device 2 hears its app');
  t.regex(r.out, /LED (on|off)/, 'the remote control drives the LED');
  t.regex(r.out, /is about to lose its WiFi/);
  t.regex(r.out, /link up .*connects=2/, 'a cut device reconnected');
  t.regex(r.out, /^\[sim\] .*device got .*device=2/m, "the devices' lines are marked as theirs");
  // With socat (installed by .ci/run) the mesh-* devices sit behind a simulated UART mesh root.
  t.regex(r.out, /reading .*from=mesh-1 via=mesh:0x0001/, 'a mesh node reached its app through the UART transport');
  // Final table: every expected client connected.
  for (const id of ['1', '2', '3', '4', 'tx', 'rx', 'mesh-1', 'mesh-2', 'mesh-3']) t.regex(r.out, new RegExp(`^${id}\\s+(up|down)\\s+\\d+`, 'm'));
});

test('serve and sim: two processes talk over TCP; SIGTERM stops the server cleanly', async (t) => {
  const port = await freePort();
  const srv = spawn(process.execPath, [BIN, 'serve', '--port', String(port), '--http-port', '0', '--app', 'examples/json-exchange.ts=*'], {
    cwd: path.join(__dirname, '..'),
  });
  const exited = new Promise<number | null>((r) => srv.once('exit', (code) => r(code)));
  let out = '';
  srv.stdout.on('data', (d) => (out += d));
  t.teardown(() => srv.kill('SIGKILL'));
  await Promise.race([
    new Promise<void>((resolve) => {
      const check = () => out.includes('listening') && resolve();
      srv.stdout.on('data', check);
      check();
    }),
    exited.then(() => Promise.reject(new Error(`server exited early: ${out}`))),
  ]);
  const sim = await run(['sim', '--port', String(port), '--ids', 'sim-a,sim-b', '--app', 'examples/json-exchange.ts', '--duration', '5']);
  t.is(sim.code, 0, sim.err);
  t.regex(sim.out, /device got .*device=sim-a/);
  srv.kill('SIGTERM');
  t.is(await exited, 0);
  t.regex(out, /app got .*from=sim-b/);
  t.regex(out, /stopping why=SIGTERM/);
  t.regex(out, /^sim-a\s+(up|down)/m, 'the exit table lists the simulated devices');
});

test('a bad config is refused with a message that says what to fix', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-'));
  const file = path.join(dir, 'bad.json');
  fs.writeFileSync(file, JSON.stringify({ port: 'eighty', timout: 2000 }));
  const r = await run(['serve', '--config', file]);
  t.is(r.code, 1);
  t.regex(r.err, /unknown key "timout"\. Known keys: .*timeout/);
  fs.writeFileSync(file, JSON.stringify({ port: 99999 }));
  const r2 = await run(['serve', '--config', file]);
  t.regex(r2.err, /"port" must be an integer from 0 to 65535, got 99999/);
  fs.writeFileSync(file, '{ "port": ');
  const r3 = await run(['serve', '--config', file]);
  t.regex(r3.err, /not valid JSON .*fix the syntax/);
  const r4 = await run(['serve', '--config', path.join(dir, 'missing.json')]);
  t.regex(r4.err, /cannot read it \(ENOENT\)/);
  fs.writeFileSync(file, JSON.stringify({ http: { port: 80800 } }));
  const r6 = await run(['serve', '--config', file]);
  t.regex(r6.err, /"http" must be an object whose "port" is an integer from 0 to 65535/);
  const r7 = await run(['serve', '--http-port', 'eighty']);
  t.regex(r7.err, /--http-port must be a port number \(0-65535; 0 = any free port\), got "eighty"/);
  const r5 = await run(['bogus']);
  t.is(r5.code, 2);
  t.regex(r5.err, /unknown command "bogus"/);
});

test('chaos: proxies devices to a server on loopback, injects faults, prints the counts at exit', async (t) => {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: 400, logger: silentLogger });
  t.teardown(() => server.close());
  const proc = spawn(
    process.execPath,
    [BIN, 'chaos', '--target', `127.0.0.1:${server.port}`, '--seed', '9', '--every', '100', '--kinds', 'cut,delay', '--duration', '3'],
    { cwd: path.join(__dirname, '..') },
  );
  t.teardown(() => proc.kill('SIGKILL'));
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  let out = '';
  proc.stdout.on('data', (d) => (out += d));
  const port = await new Promise<number>((resolve, reject) => {
    const check = () => {
      const m = /chaos proxy on 127\.0\.0\.1:(\d+) → 127\.0\.0\.1:\d+, seed 9/.exec(out);
      if (m) resolve(Number(m[1]));
    };
    proc.stdout.on('data', check);
    void exited.then(() => reject(new Error(`chaos exited early: ${out}`)));
  });
  const client = new Client({ id: 'through-chaos', port, timeout: 400, reconnectDelay: 100, retryMin: 50, logger: silentLogger });
  t.teardown(() => client.close());
  await client.connect();
  t.is(await exited, 0);
  const m = /faults injected: (\d+) \(cut (\d+), blackhole 0, delay (\d+), split 0\)/.exec(out);
  t.truthy(m, out);
  t.true(Number(m![1]) > 0, out);
  t.true(client.connects >= 1);
});

test('demo by default: the server view only, an outage whose message is resent and delivered once, a clean Ctrl-C', async (t) => {
  // Its own process group, as a terminal runs it: Ctrl-C signals the whole group (socat included).
  const proc = spawn(process.execPath, [BIN, 'demo', '--port', '0', '--http-port', '0', '--outage-every', '2'], {
    cwd: path.join(__dirname, '..'),
    detached: true,
  });
  let out = '';
  let code: number | null | undefined;
  proc.stdout.on('data', (d) => (out += d));
  proc.stderr.on('data', (d) => (out += d));
  const exited = new Promise<number | null>((r) => proc.once('exit', (c) => r((code = c))));
  t.teardown(() => {
    if (code === undefined) process.kill(-proc.pid!, 'SIGKILL');
  });
  await eventually(() => code !== undefined || /resent \d+ after the outage, delivered once/.test(out), 110_000, 'an outage to heal');
  t.is(code, undefined, out);
  process.kill(-proc.pid!, 'SIGINT');
  t.is(await exited, 0, out);
  t.regex(out, /lost its WiFi: the message to it is in flight, unacknowledged/);
  t.regex(out, /demo: \S+ is back: resent \d+ after the outage, delivered once .*resentByServer=[1-9]/);
  t.regex(out, /stopping why=SIGINT/);
  t.notRegex(out, / (WARN|ERROR) /, 'nothing goes wrong on the way out (socat outlives the Ctrl-C)');
  t.notRegex(out, /app got|device got|^\[sim\]/m, "the apps' and devices' own lines wait for --verbose");
  t.notRegex(out.slice(out.indexOf('stopping why=SIGINT')), /link down/, 'the links the shutdown closes are not reported as outages');
  t.regex(out, /clients when the stop came \(the shutdown then closed their links\):/);
  const rows = [...out.matchAll(/^(\S+)\s+(up|down)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$/gm)];
  t.true(rows.some((m) => Number(m[7]) > 0), `the exit table shows a retransmit:\n${out}`);
});

test('a bad flag is blamed on the flag, not on the config file', async (t) => {
  const [port, level, outage, clients, verbose] = await Promise.all([
    run(['serve', '--port', 'abc']),
    run(['serve', '--log-level', 'loud']),
    run(['demo', '--outage-every', 'soon']),
    run(['sim', '--clients', 'many']),
    run(['serve', '--verbose']),
  ]);
  t.is(port.code, 1);
  t.regex(port.err, /^tether: --port must be a port number \(0-65535; 0 = any free port\), got "abc"$/m);
  t.notRegex(port.err, /got null|command line|\.json/);
  t.regex(level.err, /--log-level must be one of debug, info, warn, error, silent, got "loud"/);
  t.regex(outage.err, /--outage-every must be a number of seconds \(0 = never\), got "soon"/);
  t.regex(clients.err, /--clients must be a whole number of devices \(1-100000\), got "many"/);
  t.regex(verbose.err, /--verbose goes with tether demo/);
});
