/**
 * The parts of `tether demo` (and `tether sim`) that are not the server: simulated
 * devices, their WiFi, the outages the demo stages, and how its output is kept
 * readable (the server's view, with the devices' own logs behind `--verbose`).
 */
import * as net from 'node:net';
import type { DeviceFn } from './apps';
import { Client } from './client';
import type { Connection } from './connection';
import type { Link, LinkHandlers } from './link';
import { createLogger, formatPretty, Logger, LogRecord, safeJson } from './log';
import type { Server } from './server';
import { TcpLink } from './transports/tcp';
import { sleep } from './util';

export interface SimOptions {
  /** Server address and port the devices dial. */
  host: string;
  port: number;
  timeout: number;
  maxLineLength: number;
  /** Give every device a {@link Radio} (the demo's staged outages need one). Default false: plain TCP. */
  radios?: boolean;
}

export interface SimDevice {
  client: Client;
  /** Its WiFi, when the fleet was made with `radios`. */
  radio: Radio | null;
}

/** Simulated devices (Node Clients) running device halves of app scripts. */
export class SimFleet {
  readonly devices = new Map<string, SimDevice>();
  private readonly stop = new AbortController();
  private readonly tasks: Promise<unknown>[] = [];

  constructor(
    private readonly opts: SimOptions,
    private readonly log: Logger,
  ) {}

  start(id: string, fn: DeviceFn): void {
    if (this.devices.has(id)) return;
    const { host, port, timeout } = this.opts;
    const radio = this.opts.radios ? new Radio(host, port, timeout) : null;
    const client = new Client({
      id,
      host,
      port,
      timeout,
      maxLineLength: this.opts.maxLineLength,
      logger: this.log,
      dial: radio ? radio.dial : undefined,
    });
    this.devices.set(id, { client, radio });
    const ctx = { id, log: this.log.child({ device: id }), signal: this.stop.signal };
    this.tasks.push(
      (async () => {
        await client.connect();
        await fn(client, ctx);
      })().catch((e) => {
        if (!this.stop.signal.aborted) ctx.log.error('simulated device failed', { error: (e as Error).stack });
      }),
    );
  }

  async close(): Promise<void> {
    this.stop.abort();
    for (const d of this.devices.values()) d.client.close();
    await Promise.allSettled(this.tasks);
  }
}

/** True if `chunk` holds the start of a message line (two hex digits and a payload), not just ACKs and keepalives. */
function carriesMessage(chunk: Buffer): boolean {
  return /(?:^|\n)[0-9a-fA-F]{2}[^\n]/.test(chunk.toString('latin1'));
}

/**
 * A simulated device's WiFi. Its links are ordinary TCP links until `fade()`:
 * then the next message the server sends is lost in the air and the radio goes
 * silent both ways, as a board that drifts out of range does. Nothing is
 * closed: both ends find out from the missing keepalives, exactly as they
 * would in the field, and the device dials again once it has noticed. The
 * lost message is then in flight, unacknowledged, and has to be resent.
 */
export class Radio {
  private link: RadioLink | null = null;
  /** Messages from the server that reached the device so far. */
  messagesHeard = 0;

  constructor(
    private readonly host: string,
    private readonly port: number,
    private readonly timeout: number,
  ) {}

  /** For `Client({ dial })`: opens a TCP connection and wraps it. */
  readonly dial = async (): Promise<Link> => {
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect({ host: this.host, port: this.port });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new Error(`connect timed out after ${this.timeout} ms`));
      }, this.timeout);
      s.once('connect', () => {
        clearTimeout(timer);
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        s.destroy();
        reject(new Error(err.code ?? err.message));
      });
    });
    this.link = new RadioLink(new TcpLink(socket), this);
    return this.link;
  };

  /**
   * Goes silent at the next message from the server (which is lost), or after
   * `maxWait` ms if none comes. Resolves with what happened.
   */
  fade(maxWait: number, signal: AbortSignal): Promise<'message lost' | 'no message came' | 'stopped'> {
    const link = this.link;
    if (!link || link.silent) return Promise.resolve('no message came');
    return new Promise((resolve) => {
      const end = (how: 'message lost' | 'no message came' | 'stopped') => {
        clearTimeout(timer);
        signal.removeEventListener('abort', stopped);
        link.armed = null;
        if (how !== 'stopped') link.silent = true;
        resolve(how);
      };
      const stopped = () => end('stopped');
      const timer = setTimeout(() => end('no message came'), maxWait);
      signal.addEventListener('abort', stopped, { once: true });
      link.armed = () => end('message lost');
    });
  }
}

class RadioLink implements Link {
  /** Nothing passes either way any more. */
  silent = false;
  /** Set by fade(): called when the next message from the server is dropped. */
  armed: (() => void) | null = null;

  constructor(
    private readonly inner: TcpLink,
    private readonly radio: Radio,
  ) {}

  get remote(): string {
    return this.inner.remote;
  }

  get address(): string {
    return this.inner.address;
  }

  write(data: string): boolean {
    return this.silent ? true : this.inner.write(data);
  }

  pause(): void {
    this.inner.pause();
  }

  resume(): void {
    this.inner.resume();
  }

  close(reason: string): void {
    this.inner.close(reason);
  }

  setHandlers(h: LinkHandlers | null): void {
    if (!h) return this.inner.setHandlers(null);
    this.inner.setHandlers({
      data: (chunk) => {
        if (this.silent) return;
        if (carriesMessage(chunk)) {
          if (this.armed) {
            this.armed(); // goes silent
            return;
          }
          this.radio.messagesHeard++;
        }
        h.data(chunk);
      },
      close: (reason) => h.close(reason),
      drain: () => h.drain(),
    });
  }
}

interface Snapshot {
  srvOut: number;
  srvIn: number;
  srvResent: number;
  srvDupes: number;
  devOut: number;
  devIn: number;
  devResent: number;
  devDupes: number;
}

function snapshot(conn: Connection, client: Client): Snapshot {
  const s = conn.counters;
  const d = client.counters;
  return {
    srvOut: s.messagesOut,
    srvIn: s.messagesIn,
    srvResent: s.retransmits,
    srvDupes: s.duplicatesDropped,
    devOut: d.messagesOut,
    devIn: d.messagesIn,
    devResent: d.retransmits,
    devDupes: d.duplicatesDropped,
  };
}

const quiet = (e: Endpointish) => e.isUp && e.inFlight === 0 && e.queuedWrites === 0;
interface Endpointish {
  isUp: boolean;
  inFlight: number;
  queuedWrites: number;
}

/**
 * The demo's staged outages: every `every` ms one simulated device (one that
 * the server sends messages to) loses its WiFi just as a message to it is on
 * its way. When the device is back and both ends have nothing left in flight,
 * one line tells what was resent and checks that every message went through
 * exactly once: each end's new messages equal the other end's received ones.
 */
export class DemoOutages {
  private timer: NodeJS.Timeout | null = null;
  private readonly busy = new Set<string>();
  private readonly stop = new AbortController();
  private readonly episodes = new Set<Promise<void>>();
  /** Outages staged and their outcomes so far. */
  readonly stats = { staged: 0, healed: 0, resent: 0 };

  constructor(
    private readonly server: Server,
    private readonly sims: SimFleet,
    private readonly log: Logger,
    private readonly timeout: number,
  ) {}

  start(everyMs: number): void {
    if (everyMs <= 0) return;
    this.timer = setInterval(() => this.next(), everyMs);
  }

  private next(): void {
    const candidates = [...this.sims.devices].filter(
      ([id, d]) => d.radio && d.radio.messagesHeard > 0 && d.client.isUp && !this.busy.has(id) && this.server.get(id)?.isUp,
    );
    if (candidates.length === 0) return;
    const [id, dev] = candidates[Math.floor(Math.random() * candidates.length)];
    const p = this.episode(id, dev).finally(() => {
      this.busy.delete(id);
      this.episodes.delete(p);
    });
    this.busy.add(id);
    this.episodes.add(p);
  }

  private async episode(id: string, dev: SimDevice): Promise<void> {
    const conn = this.server.get(id)!;
    const signal = this.stop.signal;
    this.stats.staged++;
    this.log.info(`demo: ${id} is about to lose its WiFi, with the next message to it in the air`, { device: id });
    const before = snapshot(conn, dev.client);
    const how = await dev.radio!.fade(4 * this.timeout + 10_000, signal);
    if (how === 'stopped') return;
    const lostAt = Date.now();
    if (how === 'message lost') this.log.info(`demo: ${id} lost its WiFi: the message to it is in flight, unacknowledged`, { device: id });
    else this.log.info(`demo: ${id} lost its WiFi (no message to it was on its way)`, { device: id });
    // Back: the server has seen the link go down and come up again, and both ends have settled.
    const wentDown = new Promise<void>((resolve) => (conn.isUp ? conn.once('down', () => resolve()) : resolve()));
    await Promise.race([wentDown, sleep(10 * this.timeout, signal)]);
    const deadline = Date.now() + 20 * this.timeout + 30_000;
    while (!signal.aborted && !(quiet(conn) && quiet(dev.client)) && Date.now() < deadline) await sleep(100, signal);
    if (signal.aborted) return;
    if (!(quiet(conn) && quiet(dev.client))) {
      this.log.warn(`demo: ${id} has not settled after its outage`, { device: id, up: conn.isUp, inFlight: conn.inFlight, deviceInFlight: dev.client.inFlight });
      return;
    }
    const after = snapshot(conn, dev.client);
    const d = (k: keyof Snapshot) => after[k] - before[k];
    const resent = d('srvResent') + d('devResent');
    const fields = {
      device: id,
      outage: `${((Date.now() - lostAt) / 1000).toFixed(1)} s`,
      resentByServer: d('srvResent'),
      resentByDevice: d('devResent'),
      duplicatesDropped: d('srvDupes') + d('devDupes'),
    };
    this.stats.healed++;
    this.stats.resent += resent;
    // Every message first sent by one end was received as new by the other: none lost, none twice.
    if (d('srvOut') !== d('devIn') || d('devOut') !== d('srvIn')) {
      this.log.warn(`demo: ${id}: messages sent and received differ after the outage`, {
        ...fields,
        serverSent: d('srvOut'),
        deviceReceived: d('devIn'),
        deviceSent: d('devOut'),
        serverReceived: d('srvIn'),
      });
    } else if (resent > 0) {
      this.log.info(`demo: ${id} is back: resent ${resent} after the outage, delivered once`, fields);
    } else {
      this.log.info(`demo: ${id} is back: nothing was in flight, nothing to resend`, fields);
    }
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.stop.abort();
    await Promise.allSettled([...this.episodes]);
  }
}

/** One line of the whole fleet as the server sees it. */
export function fleetStatus(server: Server): string {
  const conns = server.connections();
  let up = 0;
  const k = { messagesIn: 0, messagesOut: 0, outages: 0, retransmits: 0, duplicatesDropped: 0 };
  for (const c of conns) {
    if (c.isUp) up++;
    for (const key of Object.keys(k) as (keyof typeof k)[]) k[key] += c.counters[key];
  }
  return (
    `demo: ${up}/${conns.length} devices up; messages in ${k.messagesIn}, out ${k.messagesOut}; ` +
    `outages ${k.outages}; resent ${k.retransmits}; duplicates dropped ${k.duplicatesDropped}`
  );
}

/** The exit table: one row per client, as the server saw it when the stop came. */
export function summary(server: Server): string {
  const rows = server.connections().map((c) => {
    const k = c.counters;
    return [c.id, c.state, k.connects, k.outages, k.messagesIn, k.messagesOut, k.retransmits, k.duplicatesDropped];
  });
  const head = ['client', 'state', 'connects', 'outages', 'in', 'out', 'retransmits', 'dupes dropped'];
  const all = [head, ...rows].map((r) => r.map(String));
  const w = head.map((_, i) => Math.max(...all.map((r) => r[i].length)));
  return all.map((r) => r.map((c, i) => c.padEnd(w[i])).join('  ').trimEnd()).join('\n');
}

/** Messages about links that the demo's own shutdown produces (hidden unless --verbose). */
const SHUTDOWN_NOISE = new Set(['link down', 'mesh node down', 'mesh serial port closed']);

export interface DemoLogging {
  /** The server's logger (apps' per-message logs included, shown with --verbose). */
  log: Logger;
  /** The simulated devices' logger: their lines are marked `[sim]`. */
  devices: Logger;
  /** From now on the links the shutdown closes are not reported (unless verbose). */
  stopping(): void;
}

/**
 * The demo's output: by default the server's view only (its links, the demo's
 * own story, warnings and errors from anyone); `verbose` adds every app's and
 * every simulated device's info lines. Device lines are marked `[sim]` so the
 * two sides never read as one.
 */
export function demoLogging(opts: { level: LogRecord['level'] | 'silent'; format: 'pretty' | 'json'; verbose: boolean; stream?: NodeJS.WritableStream }): DemoLogging {
  const stream = opts.stream ?? process.stdout;
  let stopping = false;
  const sink = (rec: LogRecord) => {
    const device = rec.side === 'device' || rec.side === 'mesh-root';
    const chatter = rec.level === 'info' || rec.level === 'debug';
    if (!opts.verbose && chatter && (device || rec.app !== undefined || (stopping && SHUTDOWN_NOISE.has(rec.msg)))) return;
    if (opts.format === 'json') {
      stream.write(safeJson(rec, (_k, v) => (v instanceof Error ? v.message : v)) + '\n');
      return;
    }
    if (!device) {
      stream.write(formatPretty(rec) + '\n');
      return;
    }
    const { side: _side, ...rest } = rec;
    stream.write(`[sim] ${formatPretty(rest as LogRecord)}\n`);
  };
  const log = createLogger({ level: opts.level, sink });
  return { log, devices: log.child({ side: 'device' }), stopping: () => (stopping = true) };
}
