/**
 * The qos demo, after the original micropython-iot one: both sides send numbered
 * qos messages, `{"n": 0, "boot": "…"}`, `{"n": 1, …}`, … at a steady rate, and each
 * keeps statistics of what it receives per peer (qos/stats.ts): duplicates,
 * missing, out of order, peer restarts. With qos every count but `received` must stay 0,
 * whatever happens to the links.
 *
 *   npx tether serve --app qos/qos.ts=*          server half, for any client ID
 *   npx tether sim --clients 4 --app qos/qos.ts  device half on simulated devices
 *   npm run qos                                  both, in one process, through a ChaosProxy (qos/run.ts)
 *
 * Each side prints its table every QOS_PRINT_MS ms (default 5000, 0 = never) and
 * once at exit; QOS_PERIOD_MS sets the pause between messages (default 1000).
 * The MicroPython device half is clients/micropython/examples/qos.py.
 */
import { randomBytes } from 'node:crypto';
import type { AppContext, DeviceContext } from '../src/apps';
import type { Client } from '../src/client';
import type { Connection } from '../src/connection';
import type { Endpoint } from '../src/endpoint';
import { TetherError } from '../src/errors';
import { sleep } from '../src/util';
import { encodeQos, Outcome, QosStats } from './stats';

function envMs(name: string, dflt: number): number {
  const v = process.env[name];
  if (v === undefined || v === '') return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw new Error(`${name} must be a number of ms >= 0, got ${JSON.stringify(v)}`);
  return n;
}

/** Defaults of the two halves below (qos/run.ts sets its own). */
export const settings = {
  /** Pause after each message, ms. */
  periodMs: envMs('QOS_PERIOD_MS', 1000),
  /** Print the statistics table this often, ms; 0 = never. */
  printEveryMs: envMs('QOS_PRINT_MS', 5000),
};

/** What the server halves received, by client ID (and what they sent to each). */
export const atServer = new QosStats();
/** What the device halves received from the server, by client ID (and what they sent). */
export const atDevices = new QosStats();

/** Identifies one run of a sender: random, so a restarted sender shows up as a new run. */
export function newBoot(): string {
  return randomBytes(4).toString('hex');
}

export interface ExchangeOptions {
  /** Name the statistics are kept under (the client ID). */
  peer: string;
  /** Where received messages are counted (and sent ones, in `sent`). */
  stats: QosStats;
  /** Pause after each message, ms. Default `settings.periodMs`. */
  periodMs?: number;
  /** Messages to send. Default: until stopped. */
  count?: number;
  /** Stop sending: no new message is started, the one being written still completes. */
  stop?: AbortSignal;
  /** Abandon the message being written too (shutdown). */
  signal?: AbortSignal;
  /** This sender's run. Default: a new random one. */
  boot?: string;
  /** Sees every received line (with its outcome) after it is counted. */
  onLine?(line: string, outcome: Outcome): void;
}

export interface Exchange {
  boot: string;
  /** Resolves with the number of messages sent and acknowledged. */
  writing: Promise<number>;
  /** Resolves when the endpoint closes. */
  reading: Promise<void>;
}

function ended(e: unknown): boolean {
  return e instanceof TetherError && (e.code === 'ERR_ABORTED' || e.code === 'ERR_CLOSED');
}

const followers = new WeakMap<AbortSignal, Set<AbortController>>();

/**
 * A signal that aborts with `shared`. However many exchanges share one signal (an app's
 * ctx.signal), it gets one listener, not a few per exchange and per write.
 */
function follow(shared: AbortSignal): AbortSignal {
  const own = new AbortController();
  if (shared.aborted) {
    own.abort(shared.reason);
    return own.signal;
  }
  let set = followers.get(shared);
  if (!set) {
    const all = (set = new Set());
    followers.set(shared, all);
    shared.addEventListener('abort', () => all.forEach((c) => c.abort(shared.reason)), { once: true });
  }
  set.add(own);
  return own.signal;
}

/** Starts sending numbered qos messages on `ep` and counting what it receives. */
export function startExchange(ep: Endpoint, o: ExchangeOptions): Exchange {
  const boot = o.boot ?? newBoot();
  const mine = o.stats.peer(o.peer);
  const period = o.periodMs ?? settings.periodMs;
  const count = o.count ?? Infinity;
  const signal = o.signal && follow(o.signal);
  const stop = o.stop && follow(o.stop);
  const pause = signal && stop ? AbortSignal.any([signal, stop]) : (signal ?? stop);
  const reading = (async () => {
    for await (const line of ep) {
      const outcome = o.stats.take(o.peer, line.trimEnd());
      o.onLine?.(line, outcome);
    }
  })();
  const writing = (async () => {
    let n = 0;
    while (n < count && !pause?.aborted) {
      try {
        await ep.write(encodeQos(n, boot), { signal });
      } catch (e) {
        if (ended(e)) break;
        throw e;
      }
      n++;
      mine.sent++;
      if (period > 0 && n < count) await sleep(period, pause);
    }
    return n;
  })();
  return { boot, writing, reading };
}

const printers = new Map<QosStats, NodeJS.Timeout>();

/** Prints `stats` every settings.printEveryMs (once per table, however many instances) and at `signal`. */
function startPrinter(stats: QosStats, title: string, signal: AbortSignal): void {
  if (settings.printEveryMs <= 0 || printers.has(stats)) return;
  const print = () => process.stdout.write(`\n${title}\n${stats.table('client')}\n`);
  const timer = setInterval(print, settings.printEveryMs);
  timer.unref();
  printers.set(stats, timer);
  signal.addEventListener(
    'abort',
    () => {
      clearInterval(timer);
      printers.delete(stats);
      print();
    },
    { once: true },
  );
}

/** Server half: one instance per client ID. */
export default async function qos(conn: Connection, ctx: AppContext): Promise<void> {
  startPrinter(atServer, 'qos, server side: received from / sent to each device', ctx.signal);
  const x = startExchange(conn, { peer: conn.id, stats: atServer, signal: ctx.signal });
  ctx.log.info('qos exchange started', { client: conn.id, boot: x.boot });
  await Promise.all([x.writing, x.reading]);
}

/** Device half, for `tether sim` (and `tether demo` with an app list naming IDs). */
export async function device(client: Client, ctx: DeviceContext): Promise<void> {
  startPrinter(atDevices, 'qos, device side: received from / sent to the server, by device', ctx.signal);
  const x = startExchange(client, { peer: client.id, stats: atDevices, signal: ctx.signal });
  await Promise.all([x.writing, x.reading]);
}
