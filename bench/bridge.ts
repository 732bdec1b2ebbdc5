/**
 * Messages per second from devices to an app, through the MQTT bridge and a real
 * Mosquitto (device → gateway → broker → BrokerFleet) against direct delivery
 * (device → gateway → a local app reading its Connections), same devices, same
 * load. Everything on loopback; the broker is started on a free port.
 *
 *   npm run bench:bridge [-- --devices 20 --messages 2000 --rounds 3 --qos 1 --split]
 *
 * --split runs the gateway and the app in processes of their own (bench/bridge-child.ts),
 * as they would be deployed; by default everything but the broker shares this process.
 */
import { ChildProcess, fork } from 'node:child_process';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { BrokerFleet, Client, Connection, MqttBridge, Server, silentLogger } from '../src';
import { Mosquitto } from '../test/helpers/mosquitto';

const { values } = parseArgs({
  options: { devices: { type: 'string' }, messages: { type: 'string' }, rounds: { type: 'string' }, qos: { type: 'string' }, split: { type: 'boolean' } },
});
const DEVICES = Number(values.devices ?? 20);
const MESSAGES = Number(values.messages ?? 2000);
const ROUNDS = Number(values.rounds ?? 3);
const QOS = Number(values.qos ?? 1) as 1 | 2;

async function devices(port: number, tag: string): Promise<Client[]> {
  const list = Array.from({ length: DEVICES }, (_, i) => new Client({ id: `${tag}-${i}`, port, timeout: 2000, logger: silentLogger }));
  await Promise.all(list.map((d) => d.connect()));
  return list;
}

/** Every device writes MESSAGES qos lines (window of 8); resolves with msg/s once `received()` counts them all. */
async function blast(list: Client[], received: () => number): Promise<number> {
  const total = DEVICES * MESSAGES;
  const base = received();
  const t0 = process.hrtime.bigint();
  await Promise.all(
    list.map(async (d) => {
      const pending: Promise<void>[] = [];
      for (let i = 0; i < MESSAGES; i++) {
        pending.push(d.write(`${d.id} ${i} ${'x'.repeat(24)}`, { wait: false }));
        if (pending.length >= 64) await pending.shift();
      }
      await Promise.all(pending);
    }),
  );
  while (received() - base < total) await new Promise((r) => setTimeout(r, 5));
  return total / (Number(process.hrtime.bigint() - t0) / 1e9);
}

async function direct(): Promise<number[]> {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, logger: silentLogger });
  let got = 0;
  server.on('connection', (c: Connection) => void (async () => { for await (const _ of c) got++; })());
  const list = await devices(server.port, 'direct');
  const out: number[] = [];
  for (let r = 0; r < ROUNDS; r++) out.push(await blast(list, () => got));
  list.forEach((d) => d.close());
  await server.close();
  return out;
}

async function bridged(m: Mosquitto): Promise<{ rates: number[]; dups: number }> {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, logger: silentLogger });
  const bridge = new MqttBridge(server, { url: m.url, gateway: 'bench', qos: QOS, logger: silentLogger });
  await bridge.start();
  const fleet = await BrokerFleet.connect({ url: m.url, qos: QOS });
  let got = 0;
  fleet.on('message', () => got++);
  const list = await devices(server.port, 'bridged');
  const rates: number[] = [];
  for (let r = 0; r < ROUNDS; r++) rates.push(await blast(list, () => got));
  list.forEach((d) => d.close());
  const dups = fleet.duplicatesDropped;
  await fleet.close();
  await bridge.close();
  await server.close();
  return { rates, dups };
}

/** A bench/bridge-child.ts process; `count()` asks it how many lines it has seen. */
async function child(args: string[]): Promise<{ proc: ChildProcess; port: number; count: () => Promise<number> }> {
  const proc = fork(path.join(__dirname, 'bridge-child.ts'), args, { execArgv: ['-r', 'ts-node/register/transpile-only'] });
  const ready = await new Promise<{ port: number }>((resolve) => proc.once('message', (m) => resolve(m as { port: number })));
  const count = () =>
    new Promise<number>((resolve) => {
      proc.once('message', (m) => resolve((m as { count: number }).count));
      proc.send({ type: 'count' });
    });
  return { proc, port: ready.port, count };
}

/** Like blast(), but the counter lives in another process: polled every 20 ms. */
async function blastRemote(list: Client[], count: () => Promise<number>): Promise<number> {
  let seen = await count();
  const poll = setInterval(() => void count().then((n) => (seen = n)), 20);
  try {
    return await blast(list, () => seen);
  } finally {
    clearInterval(poll);
  }
}

async function split(m: Mosquitto, mode: 'direct' | 'bridged'): Promise<number[]> {
  const procs: ChildProcess[] = [];
  try {
    const gw = await child(['gateway', mode, m.url, String(QOS)]);
    procs.push(gw.proc);
    let counter = gw.count;
    if (mode === 'bridged') {
      const app = await child(['app', m.url, String(QOS)]);
      procs.push(app.proc);
      counter = app.count;
    }
    const list = await devices(gw.port, `${mode}-split`);
    const out: number[] = [];
    for (let r = 0; r < ROUNDS; r++) out.push(await blastRemote(list, counter));
    list.forEach((d) => d.close());
    return out;
  } finally {
    for (const p of procs) p.kill();
  }
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

void (async () => {
  const m = await Mosquitto.start();
  try {
    const d = values.split ? await split(m, 'direct') : await direct();
    const b = values.split ? { rates: await split(m, 'bridged'), dups: 0 } : await bridged(m);
    const fmt = (xs: number[]) => xs.map((x) => Math.round(x).toLocaleString('en')).join(', ');
    console.log(`${DEVICES} devices × ${MESSAGES} qos messages (window 8), ${ROUNDS} rounds, MQTT QoS ${QOS}, ${values.split ? 'gateway and app in processes of their own' : 'one process'}`);
    console.log(`direct  (device → gateway → local app):          ${fmt(d)} msg/s, median ${Math.round(median(d)).toLocaleString('en')}`);
    console.log(`bridged (device → gateway → Mosquitto → app):    ${fmt(b.rates)} msg/s, median ${Math.round(median(b.rates)).toLocaleString('en')}`);
    console.log(`ratio bridged/direct: ${(median(b.rates) / median(d)).toFixed(2)}${values.split ? '' : `; repeats dropped by the app: ${b.dups}`}`);
  } finally {
    await m.remove();
  }
})();
