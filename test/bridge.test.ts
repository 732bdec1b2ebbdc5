/**
 * The MQTT bridge against a real Mosquitto (Debian's, started by the test on a
 * free loopback port with a generated config): gateways mirror their devices
 * onto the broker, an app talks to the devices through the broker alone.
 */
import test, { ExecutionContext } from 'ava';
import { BrokerFleet, Client, Fleet, HttpApi, MqttBridge, Server, silentLogger } from '../src';
import { resolveConfig } from '../src/config';
import { freePort, Mosquitto, mosquittoPath, portOpen } from './helpers/mosquitto';
import { eventually } from './helpers/wait';

const TIMEOUT = 1000;
const run = mosquittoPath() ? test : test.skip;

async function broker(t: ExecutionContext): Promise<Mosquitto> {
  const m = await Mosquitto.start();
  t.teardown(() => m.remove());
  return m;
}

async function gateway(t: ExecutionContext, m: Mosquitto, name: string, prefix = 'tether'): Promise<{ server: Server; bridge: MqttBridge }> {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: TIMEOUT, logger: silentLogger, settleDelay: 20 });
  const bridge = new MqttBridge(server, { url: m.url, gateway: name, prefix });
  await bridge.start();
  t.teardown(async () => {
    await bridge.close();
    await server.close();
  });
  return { server, bridge };
}

async function app(t: ExecutionContext, m: Mosquitto, prefix = 'tether'): Promise<BrokerFleet> {
  const f = await BrokerFleet.connect({ url: m.url, prefix, resendAfter: 2000 });
  t.teardown(() => f.close());
  return f;
}

function device(t: ExecutionContext, id: string, ports: number[]): Client {
  const c = new Client({ id, servers: ports.map((p) => ({ host: '127.0.0.1', port: p })), timeout: TIMEOUT, reconnectDelay: 100, retryMin: 50, retryMax: 200, failover: 2, logger: silentLogger });
  t.teardown(() => c.close());
  return c;
}

run('up and down through the broker: device lines reach the app once, app lines reach the device with a receipt', async (t) => {
  const m = await broker(t);
  const fleet = await app(t, m);
  const gw = await gateway(t, m, 'gw-a');
  const got: string[] = [];
  fleet.on('message', (id: string, line: string) => got.push(`${id}:${line}`));
  const d = device(t, 'dev-1', [gw.server.port]);
  await d.connect();
  for (let i = 0; i < 20; i++) await d.write(`m${i}`);
  await eventually(() => got.length === 20, 10_000, 'the app to get 20 lines');
  t.deepEqual(got, Array.from({ length: 20 }, (_, i) => `dev-1:m${i}`));
  await eventually(() => fleet.status('dev-1')?.state === 'up', 5000, 'status up');
  t.is(fleet.status('dev-1')?.gateway, 'gw-a');
  await fleet.send('dev-1', 'hello device', { timeout: 10_000 });
  t.is(await d.readline(), 'hello device\n');
  t.is(gw.bridge.stats.published, 20);
  t.is(gw.bridge.stats.downDelivered, 1);
});

// ---- separate processes: two gateways, one app, devices in this process ------------------

import { ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';

const ROOT = path.join(__dirname, '..');

interface Proc {
  child: ChildProcess;
  out: string[];
  err: () => string;
}

function spawnProc(t: ExecutionContext, args: string[]): Proc {
  const child = spawn(process.execPath, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  const out: string[] = [];
  let err = '';
  let partial = '';
  child.stdout!.on('data', (d: Buffer) => {
    const lines = (partial + d.toString()).split('\n');
    partial = lines.pop()!;
    out.push(...lines);
  });
  child.stderr!.on('data', (d: Buffer) => (err += d));
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return { child, out, err: () => err };
}

/** A `tether serve` process with the bridge on; resolves once it listens. */
async function gatewayProc(t: ExecutionContext, m: Mosquitto, name: string, dir: string): Promise<{ proc: Proc; port: number }> {
  const port = await freePort();
  const cfg = {
    host: '127.0.0.1',
    port,
    timeout: TIMEOUT,
    settleDelay: 20,
    http: null,
    log: { level: 'warn', format: 'json' },
    mqtt: { url: m.url, gateway: name },
  };
  const file = path.join(dir, `${name}.json`);
  fs.writeFileSync(file, JSON.stringify(cfg));
  const proc = spawnProc(t, [path.join(ROOT, 'bin', 'tether.js'), 'serve', '--config', file]);
  await eventually(() => portOpen(port), 30_000, `${name} to listen (output: ${proc.out.slice(-5).join(" | ")} ${proc.err()})`, 50);
  return { proc, port };
}

/** examples/broker-app.ts in its own process; its JSON events are parsed from stdout. */
async function appProc(t: ExecutionContext, m: Mosquitto, clientId?: string): Promise<{ proc: Proc; events: () => Array<Record<string, string>> }> {
  const args = ['-r', 'ts-node/register/transpile-only', path.join(ROOT, 'examples', 'broker-app.ts'), '--url', m.url, '--resend-after', '2000'];
  if (clientId) args.push('--client-id', clientId);
  const proc = spawnProc(t, args);
  const events = () => proc.out.filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
  await eventually(() => events().some((e) => e.event === 'ready'), 30_000, `the app to be ready (stderr: ${proc.err()})`, 50);
  return { proc, events };
}

/** Per device: messages the app got (with repeats) and echoes the device got. */
function tally(events: Array<Record<string, string>>, devices: Client[], echoes: Map<string, string[]>, n: number) {
  const res = { missingAtApp: 0, dupAtApp: 0, missingEchoes: 0, dupEchoes: 0 };
  for (const d of devices) {
    const want = Array.from({ length: n }, (_, i) => `${d.id}-${i}`);
    const got = events.filter((e) => e.event === 'message' && e.id === d.id).map((e) => e.line);
    res.missingAtApp += want.filter((w) => !got.includes(w)).length;
    res.dupAtApp += got.length - new Set(got).size;
    const ech = echoes.get(d.id) ?? [];
    res.missingEchoes += want.filter((w) => !ech.includes(`echo:${w}\n`)).length;
    res.dupEchoes += ech.length - new Set(ech).size;
  }
  return res;
}

function readEchoes(t: ExecutionContext, devices: Client[]): Map<string, string[]> {
  const echoes = new Map<string, string[]>();
  for (const d of devices) {
    const list: string[] = [];
    echoes.set(d.id, list);
    void (async () => {
      for await (const line of d) list.push(line);
    })();
  }
  return echoes;
}

const tmpDir = (t: ExecutionContext) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-bridge-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
};

run('two gateway processes and one app process: devices on both exchange qos messages with the app exactly once', async (t) => {
  const m = await broker(t);
  const dir = tmpDir(t);
  const [a, b] = await Promise.all([gatewayProc(t, m, 'gw-a', dir), gatewayProc(t, m, 'gw-b', dir)]);
  const app = await appProc(t, m);
  const devices = ['p1', 'p2', 'p3', 'q1', 'q2', 'q3'].map((id) => device(t, id, id.startsWith('p') ? [a.port, b.port] : [b.port, a.port]));
  await Promise.all(devices.map((d) => d.connect()));
  const echoes = readEchoes(t, devices);
  const N = 40;
  await Promise.all(devices.map(async (d) => { for (let i = 0; i < N; i++) await d.write(`${d.id}-${i}`); }));
  await eventually(() => tally(app.events(), devices, echoes, N).missingEchoes === 0, 30_000, 'every echo back at its device');
  const r = tally(app.events(), devices, echoes, N);
  t.log(`app got ${devices.length * N} lines; repeats dropped by the app's filter: see stopping event; result ${JSON.stringify(r)}`);
  t.deepEqual(r, { missingAtApp: 0, dupAtApp: 0, missingEchoes: 0, dupEchoes: 0 });
  const gws = new Set(app.events().filter((e) => e.event === 'status' && e.state === 'up').map((e) => e.gateway));
  t.deepEqual([...gws].sort(), ['gw-a', 'gw-b'], 'devices were served by both gateways');
});

run('a gateway is killed (SIGKILL) mid-traffic: its devices move to the other, nothing lost, no duplicate reaches the app', async (t) => {
  const m = await broker(t);
  const dir = tmpDir(t);
  const [a, b] = await Promise.all([gatewayProc(t, m, 'gw-a', dir), gatewayProc(t, m, 'gw-b', dir)]);
  const app = await appProc(t, m);
  const devices = ['k1', 'k2', 'k3', 'k4'].map((id) => device(t, id, [a.port, b.port]));
  await Promise.all(devices.map((d) => d.connect()));
  const echoes = readEchoes(t, devices);
  const N = 60;
  let killed = false;
  await Promise.all(
    devices.map(async (d) => {
      for (let i = 0; i < N; i++) {
        if (i === 20 && !killed) {
          killed = true;
          a.proc.child.kill('SIGKILL');
        }
        await d.write(`${d.id}-${i}`);
      }
    }),
  );
  await eventually(() => tally(app.events(), devices, echoes, N).missingEchoes === 0, 60_000, 'every echo back at its device');
  const r = tally(app.events(), devices, echoes, N);
  t.log(`after the kill: ${JSON.stringify(r)}; devices now at ${devices.map((d) => d.port === b.port ? 'gw-b' : 'gw-a').join(',')}`);
  t.is(r.missingAtApp, 0, 'nothing the devices sent is lost');
  t.is(r.dupAtApp, 0, 'no duplicate reaches the app');
  t.is(r.missingEchoes, 0, "every app reply reaches its device");
  t.true(devices.every((d) => d.port === b.port), 'every device moved to gw-b');
  await eventually(() => app.events().some((e) => e.event === 'status' && e.gateway === 'gw-b'), 10_000, 'the app to see them at gw-b');
});

run('the broker restarts mid-traffic: nothing a device saw acknowledged is lost, nothing reaches the app twice', async (t) => {
  const m = await broker(t);
  const dir = tmpDir(t);
  const a = await gatewayProc(t, m, 'gw-a', dir);
  const app = await appProc(t, m, 'echo-app'); // a persistent session: the broker keeps its subscription across the restart
  const devices = ['r1', 'r2', 'r3'].map((id) => device(t, id, [a.port]));
  await Promise.all(devices.map((d) => d.connect()));
  const echoes = readEchoes(t, devices);
  const N = 60;
  let restarted: Promise<void> | null = null;
  await Promise.all(
    devices.map(async (d) => {
      for (let i = 0; i < N; i++) {
        if (i === 20 && !restarted) restarted = m.restart();
        await d.write(`${d.id}-${i}`);
      }
    }),
  );
  await restarted;
  await eventually(() => tally(app.events(), devices, echoes, N).missingEchoes === 0, 60_000, 'every echo back at its device').catch((e) => {
    const have = new Set(app.events().filter((x) => x.event === 'message').map((x) => x.line));
    t.log('missing at the app', devices.flatMap((d) => Array.from({ length: N }, (_, i) => `${d.id}-${i}`)).filter((w) => !have.has(w)));
    throw e;
  });
  const r = tally(app.events(), devices, echoes, N);
  t.log(`after the broker restart: ${JSON.stringify(r)}`);
  t.is(r.missingAtApp, 0);
  t.is(r.dupAtApp, 0);
  t.is(r.missingEchoes, 0);
});

run('config and metrics: the mqtt section is checked with messages that say what to write; /metrics shows the bridge', async (t) => {
  t.throws(() => resolveConfig({ mqtt: { url: 'localhost:1883' } }), { message: /"mqtt" must be an object whose "url" is a broker URL like "mqtt:\/\/127.0.0.1:1883"/ });
  t.throws(() => resolveConfig({ mqtt: { url: 'mqtt://x', qos: 0 } }), { message: /"qos" is 1 or 2/ });
  t.throws(() => resolveConfig({ mqtt: { url: 'mqtt://x', prefix: 'a/#' } }), { message: /topic prefix without "#"/ });
  t.is(resolveConfig({ mqtt: { url: 'mqtt://x', tls: { ca: 'ca.crt' } } }, 'local.json', '/etc/t').mqtt?.tls?.ca, '/etc/t/ca.crt');

  const m = await broker(t);
  const gw = await gateway(t, m, 'gw-m');
  const api = new HttpApi({ server: gw.server, fleet: new Fleet(gw.server), bridge: gw.bridge, host: '127.0.0.1', port: 0, logger: silentLogger });
  await api.listen();
  t.teardown(() => api.close());
  const d = device(t, 'metered', [gw.server.port]);
  await d.connect();
  await d.write('one');
  const text = await (await fetch(`http://127.0.0.1:${api.port}/metrics`)).text();
  t.regex(text, /tether_bridge_connected 1/);
  t.regex(text, /tether_bridge_messages_total\{dir="up"\} 1/);
  t.regex(text, /tether_bridge_queued 0/);
});

run('ownership moves: when a device shows up at another gateway, the stale owner lets go and down lines go to the new one', async (t) => {
  const m = await broker(t);
  const fleet = await app(t, m);
  const a = await gateway(t, m, 'gw-a');
  const b = await gateway(t, m, 'gw-b');
  // A half-open link at A: the device's old socket, still sending keepalives.
  const old = net.connect({ port: a.server.port, host: '127.0.0.1' });
  t.teardown(() => old.destroy());
  old.on('error', () => {});
  let oldClosed = false;
  old.on('close', () => (oldClosed = true));
  old.write('mover\n');
  const ka = setInterval(() => old.write('\n'), 200);
  t.teardown(() => clearInterval(ka));
  await eventually(() => fleet.status('mover')?.gateway === 'gw-a' && fleet.status('mover')?.state === 'up', 5000, 'mover up at gw-a');

  const d = device(t, 'mover', [b.server.port]);
  await d.connect();
  await eventually(() => a.bridge.stats.handedOver === 1, 5000, 'gw-a to let go');
  await eventually(() => oldClosed, 5000, "gw-a to close its stale link");
  await eventually(() => fleet.status('mover')?.gateway === 'gw-b' && fleet.status('mover')?.state === 'up', 5000, 'the retained status to name gw-b');
  await fleet.send('mover', 'to the new gateway', { timeout: 10_000 });
  t.is(await d.readline(), 'to the new gateway\n');
  t.is(a.bridge.stats.downReceived, 0, 'gw-a no longer takes its down lines');
  t.is(b.bridge.stats.downDelivered, 1);
});
