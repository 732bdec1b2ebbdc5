/**
 * Benchmark child: a load generator holding many real protocol clients (the
 * Node Client, the same code as a simulated device), or raw line clients for
 * the ceiling run. Reports counts, its own CPU and latency samples over IPC.
 */
import * as net from 'node:net';
import { Client } from '../src';

interface Job {
  mode: 'hold' | 'throughput' | 'latency' | 'ceiling';
  port: number;
  ids: string[];
  timeout: number;
  /** throughput: wait=true (the original's mode) or a window of outstanding writes. */
  wait?: boolean;
  window?: number;
  /** latency: ms between a client's messages. */
  period?: number;
  /** connections opened per batch, and ms between batches (ramp). */
  batch?: number;
  batchEvery?: number;
  payload?: number;
}

const state = {
  up: 0,
  everUp: 0,
  falseOutages: 0,
  acked: 0,
  echoed: 0,
  /** Longest write-to-ACK time seen in the throughput loop (ms). */
  ackMax: 0,
  ackRtt: [] as number[],
  echoRtt: [] as number[],
};
let running = true;
const clients: Client[] = [];
const sockets: net.Socket[] = [];

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function ramp(job: Job, open: (id: string) => void): Promise<void> {
  const batch = job.batch ?? 250;
  for (let i = 0; i < job.ids.length; i += batch) {
    for (const id of job.ids.slice(i, i + batch)) open(id);
    await sleep(job.batchEvery ?? 100);
  }
}

function protocolClient(job: Job, id: string): Client {
  const c = new Client({ id, port: job.port, timeout: job.timeout, window: job.window ?? 8, retryMin: 200 });
  c.on('up', () => {
    state.up++;
    state.everUp++;
  });
  c.on('down', () => {
    state.up--;
    if (running) state.falseOutages++;
  });
  clients.push(c);
  void c.connect().catch(() => {});
  return c;
}

async function throughputLoop(job: Job, c: Client, body: string): Promise<void> {
  await c.ready();
  const reader = (async () => {
    for await (const _ of c) state.echoed++;
  })();
  reader.catch(() => {});
  if (job.wait !== false) {
    while (running) {
      const t0 = performance.now();
      await c.write(body).catch(() => {});
      state.ackMax = Math.max(state.ackMax, performance.now() - t0);
      state.acked++;
    }
    return;
  }
  // Windowed: keep up to `window` writes outstanding (the write queue bounds it too).
  const inflight = new Set<Promise<void>>();
  while (running) {
    const t0 = performance.now();
    const p: Promise<void> = c.write(body, { wait: false }).then(
      () => {
        state.ackMax = Math.max(state.ackMax, performance.now() - t0);
        state.acked++;
        inflight.delete(p);
      },
      () => {
        inflight.delete(p);
      },
    );
    inflight.add(p);
    if (inflight.size >= (job.window ?? 8)) await Promise.race(inflight);
  }
}

async function latencyLoop(job: Job, c: Client, id: string): Promise<void> {
  await c.ready();
  const sentAt = new Map<string, number>();
  const reader = (async () => {
    for await (const line of c) {
      const t0 = sentAt.get(line.trimEnd());
      if (t0 !== undefined) {
        state.echoRtt.push(performance.now() - t0);
        sentAt.delete(line.trimEnd());
      }
      state.echoed++;
    }
  })();
  reader.catch(() => {});
  // Past the connect and the server's settle delay, then spread the clients over the period.
  await sleep(job.timeout + Math.random() * job.period!);
  for (let n = 0; running; n++) {
    const msg = `${id}:${n}`;
    const t0 = performance.now();
    sentAt.set(msg, t0);
    await c.write(msg).catch(() => {});
    state.ackRtt.push(performance.now() - t0);
    state.acked++;
    const left = job.period! - (performance.now() - t0);
    if (left > 0) await sleep(left);
  }
}

function ceilingClient(job: Job, body: string): void {
  const s = net.connect({ port: job.port, host: '127.0.0.1' });
  sockets.push(s);
  s.setNoDelay(true);
  s.on('error', () => {});
  let buf = '';
  s.on('connect', () => {
    state.up++;
    s.write(body + '\n');
  });
  s.on('data', (d) => {
    buf += d.toString('latin1');
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      buf = buf.slice(nl + 1);
      state.echoed++;
      state.acked++;
      if (running) s.write(body + '\n');
    }
  });
}

process.on('message', async (m: { cmd: string; job?: Job }) => {
  if (m.cmd === 'start') {
    const job = m.job!;
    const body = 'x'.repeat(job.payload ?? 32);
    await ramp(job, (id) => {
      if (job.mode === 'ceiling') return ceilingClient(job, body);
      const c = protocolClient(job, id);
      if (job.mode === 'throughput') void throughputLoop(job, c, body);
      if (job.mode === 'latency') void latencyLoop(job, c, id);
    });
    process.send!({ type: 'ramped' });
  } else if (m.cmd === 'stats') {
    process.send!({
      type: 'stats',
      up: state.up,
      everUp: state.everUp,
      falseOutages: state.falseOutages,
      acked: state.acked,
      echoed: state.echoed,
      ackMax: state.ackMax,
      retransmits: clients.reduce((a, c) => a + c.counters.retransmits, 0),
      cpu: process.cpuUsage(),
      rss: process.memoryUsage().rss,
    });
  } else if (m.cmd === 'samples') {
    process.send!({ type: 'samples', ackRtt: state.ackRtt, echoRtt: state.echoRtt });
  } else if (m.cmd === 'stop') {
    running = false;
    for (const c of clients) c.close();
    for (const s of sockets) s.destroy();
    process.send!({ type: 'stopped' });
  } else if (m.cmd === 'exit') {
    process.exit(0);
  }
});
process.send!({ type: 'hello' });
