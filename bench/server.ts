/**
 * Benchmark child: the server under test. `tether` = a tether Server whose app
 * echoes every line back (qos); `ceiling` = a minimal line-echo server with no
 * protocol state, the machine's ceiling for the same traffic. Reports its own
 * CPU and memory to the parent over IPC.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import * as net from 'node:net';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Connection, Server, silentLogger } from '../src';

const mode = process.argv[2] as 'tether' | 'ceiling';
const timeout = Number(process.argv[3] ?? 2000);
/** wait: the echo writes with wait=true; window: wait=false, awaited only when 32 are queued; readme: the README's loop, each qos write awaited. */
const echo = (process.argv[4] ?? 'wait') as 'wait' | 'window' | 'readme';
const lag = monitorEventLoopDelay({ resolution: 10 });
lag.enable();

function send(m: object): void {
  process.send!(m);
}

async function tether(): Promise<() => object> {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout, logger: silentLogger, maxConnections: 100_000, maxConnectionsPerAddress: 100_000 }); // every benchmark client comes from 127.0.0.1
  // BENCH_ALS=1: run each app instance inside an AsyncLocalStorage context, as `tether serve`'s
  // AppRunner does (to measure what tracing app errors costs the message path).
  const als = process.env.BENCH_ALS === '1' ? new AsyncLocalStorage<string>() : null;
  server.on('connection', (conn: Connection) => {
    const run = (f: () => void) => (als ? als.run(conn.id, f) : f());
    run(() => void (async () => {
      for await (const line of conn) {
        if (echo === 'readme') {
          await conn.write(line, { qos: true, wait: false }).catch(() => {});
          continue;
        }
        const p = conn.write(line, { wait: echo === 'wait' });
        p.catch(() => {});
        if (conn.queuedWrites >= 32) await p.catch(() => {});
      }
    })());
  });
  send({ type: 'ready', port: server.port });
  return () => {
    let up = 0;
    let outages = 0;
    let messagesIn = 0;
    let messagesOut = 0;
    let retransmits = 0;
    let shed = 0;
    for (const c of server.connections()) {
      if (c.isUp) up++;
      outages += c.counters.outages;
      messagesIn += c.counters.messagesIn;
      messagesOut += c.counters.messagesOut;
      retransmits += c.counters.retransmits;
      shed += c.counters.shed;
    }
    return { up, outages, messagesIn, messagesOut, retransmits, shed };
  };
}

async function ceiling(): Promise<() => object> {
  let up = 0;
  const srv = net.createServer((s) => {
    up++;
    s.setNoDelay(true);
    s.on('data', (d) => s.write(d)); // lines come back as they came
    s.on('error', () => {});
    s.on('close', () => up--);
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  send({ type: 'ready', port: (srv.address() as net.AddressInfo).port });
  return () => ({ up, outages: 0, messagesIn: 0, messagesOut: 0, retransmits: 0, shed: 0 });
}

void (async () => {
  const counts = mode === 'ceiling' ? await ceiling() : await tether();
  process.on('message', (m: { cmd: string }) => {
    if (m.cmd === 'stats') {
      if (typeof global.gc === 'function') global.gc();
      const mem = process.memoryUsage();
      send({
        type: 'stats',
        rss: mem.rss,
        heapUsed: mem.heapUsed,
        cpu: process.cpuUsage(),
        lagP99: lag.percentile(99) / 1e6,
        ...counts(),
      });
    } else if (m.cmd === 'exit') {
      process.exit(0);
    }
  });
})();
