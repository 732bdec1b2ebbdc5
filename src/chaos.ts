/**
 * ChaosProxy: a TCP proxy between devices and the server that injects the faults
 * a WiFi link produces, on a seeded random schedule or by hand (tests):
 *
 * - cut:       both sockets destroyed at once (a dropped connection);
 * - blackhole: bytes dropped both ways, sockets left open, so only keepalive timeouts
 *              can notice; a pair still open when the period ends is cut (its byte
 *              stream has a hole, it cannot carry on);
 * - delay:     for a while, every chunk is held back by `delayMs` (order kept);
 * - split:     for a while, every chunk is delivered one byte at a time, each byte
 *              its own write (on its own turn of the event loop).
 *
 * It listens on 127.0.0.1 unless told otherwise. Everything it does stops at close().
 */
import { EventEmitter } from 'node:events';
import * as net from 'node:net';
import { TetherError } from './errors';
import type { Logger } from './log';
import { silentLogger } from './log';
import { prng, shown } from './util';

export type FaultKind = 'cut' | 'blackhole' | 'delay' | 'split';
export const FAULT_KINDS: readonly FaultKind[] = ['cut', 'blackhole', 'delay', 'split'];

export interface ChaosOptions {
  /** Address to listen on. Default `127.0.0.1`: anything else exposes the proxy to the network. */
  listenHost?: string;
  /** Port to listen on; 0 (default) picks a free one (see `port`). */
  listenPort?: number;
  /** Where to forward. Default `127.0.0.1`. */
  targetHost?: string;
  targetPort: number;
  /** Seed of the random schedule (and of the random choices). Default: random (see `seed`). */
  seed?: number;
  /** Mean ms between random faults (each wait is uniform in 0.5–1.5 × every); 0 = manual faults only. Default 0. */
  every?: number;
  /** Kinds the random schedule picks from (uniformly). Default all four. */
  kinds?: FaultKind[];
  /** How long a random blackhole lasts, ms. Default 3000 (longer than the default 2000 ms protocol timeout). */
  blackholeMs?: number;
  /** How long a random delay holds each chunk back, ms. Default 300. */
  delayMs?: number;
  /** How long a random delay period lasts, ms. Default 2000. */
  delayForMs?: number;
  /** How long a random split period lasts, ms. Default 2000. */
  splitMs?: number;
  logger?: Logger;
}

export const CHAOS_DEFAULTS = {
  listenHost: '127.0.0.1',
  listenPort: 0,
  targetHost: '127.0.0.1',
  every: 0,
  blackholeMs: 3000,
  delayMs: 300,
  delayForMs: 2000,
  splitMs: 2000,
} as const;

/** One fault, as kept in `ChaosProxy.recent`. */
export interface FaultRecord {
  /** Date.now() when it was injected. */
  at: number;
  kind: FaultKind;
  /** The connection hit (device address:port); null for a random fault that found no live connection. */
  conn: string | null;
}

/** Faults kept in `recent`. */
const RECENT = 1000;

/** Bytes held by one direction of a pair during a delay or split. */
interface Held {
  due: number;
  data: Buffer;
  split: boolean;
}

/** One direction of a proxied connection. */
class Pipe {
  private readonly held: Held[] = [];
  private timer: NodeJS.Timeout | null = null;
  private next: NodeJS.Immediate | null = null;
  private blocked = false;
  /** The source has closed: end the destination once the held bytes are out. */
  private ending = false;

  constructor(
    private readonly pair: Pair,
    private readonly from: net.Socket,
    private readonly to: net.Socket,
  ) {}

  get heldChunks(): number {
    return this.held.length;
  }

  push(chunk: Buffer): void {
    const p = this.pair;
    if (p.blackholed || p.gone) return;
    const now = Date.now();
    const delay = now < p.delayUntil ? p.delayMs : 0;
    const split = now < p.splitUntil && chunk.length > 1;
    if (delay === 0 && !split && this.held.length === 0) {
      this.write(chunk);
      return;
    }
    // Never before what is already held: order is kept.
    const last = this.held.length > 0 ? this.held[this.held.length - 1].due : 0;
    this.held.push({ due: Math.max(now + delay, last), data: chunk, split });
    this.pump();
  }

  /** The source closed: pass the close on after whatever is still held. */
  end(): void {
    this.ending = true;
    if (this.held.length === 0) this.finish();
  }

  /** Sends what is held now, in order, whole. */
  release(): void {
    for (const h of this.held) {
      h.due = 0;
      h.split = false;
    }
    if (this.timer) clearTimeout(this.timer);
    if (this.next) clearImmediate(this.next);
    this.timer = this.next = null;
    this.pump();
  }

  clear(): void {
    this.held.length = 0;
    if (this.timer) clearTimeout(this.timer);
    if (this.next) clearImmediate(this.next);
    this.timer = this.next = null;
  }

  private finish(): void {
    if (this.pair.blackholed || this.to.destroyed) return;
    this.to.end(() => this.to.destroy());
  }

  private write(data: Buffer): void {
    if (this.to.destroyed) return;
    if (!this.to.write(data) && !this.blocked) {
      // TCP backpressure passes through: stop reading the source until the destination drains.
      this.blocked = true;
      this.from.pause();
      this.to.once('drain', () => {
        this.blocked = false;
        this.from.resume();
      });
    }
  }

  private pump(): void {
    if (this.timer || this.next) return;
    while (this.held.length > 0) {
      if (this.pair.blackholed || this.pair.gone) {
        this.clear();
        return;
      }
      const head = this.held[0];
      const wait = head.due - Date.now();
      if (wait > 0) {
        this.timer = setTimeout(() => {
          this.timer = null;
          this.pump();
        }, wait);
        return;
      }
      if (!head.split) {
        this.held.shift();
        this.write(head.data);
        continue;
      }
      this.write(head.data.subarray(0, 1));
      head.data = head.data.subarray(1);
      if (head.data.length === 0) this.held.shift();
      if (this.held.length > 0) {
        this.next = setImmediate(() => {
          this.next = null;
          this.pump();
        });
        return;
      }
    }
    if (this.ending) this.finish();
  }
}

/** A device's socket (a) and ours to the target (b). */
class Pair {
  readonly name: string;
  readonly up: Pipe;
  readonly down: Pipe;
  blackholed = false;
  /** Both sockets are gone (cut, closed, or the proxy closed). */
  gone = false;
  delayUntil = 0;
  delayMs = 0;
  splitUntil = 0;
  private blackholeTimer: NodeJS.Timeout | null = null;

  constructor(
    readonly a: net.Socket,
    readonly b: net.Socket,
    private readonly onGone: (p: Pair) => void,
  ) {
    this.name = `${a.remoteAddress}:${a.remotePort}`;
    this.up = new Pipe(this, a, b);
    this.down = new Pipe(this, b, a);
    for (const s of [a, b]) {
      s.setNoDelay(true);
      s.on('error', () => {});
    }
    a.on('data', (d: Buffer) => this.up.push(d));
    b.on('data', (d: Buffer) => this.down.push(d));
    // A close passes through, after the bytes still held; a blackholed pair says nothing.
    a.on('close', () => this.closed(this.up));
    b.on('close', () => this.closed(this.down));
  }

  get live(): boolean {
    return !this.gone && !this.blackholed && !this.a.destroyed && !this.b.destroyed;
  }

  cut(): void {
    this.a.destroy();
    this.b.destroy();
    this.retire();
  }

  blackhole(ms: number | undefined): void {
    this.blackholed = true;
    this.up.clear();
    this.down.clear();
    if (ms !== undefined) {
      this.blackholeTimer = setTimeout(() => this.cut(), ms);
      this.blackholeTimer.unref();
    }
  }

  private closed(pipe: Pipe): void {
    if (this.a.destroyed && this.b.destroyed) {
      this.retire();
      return;
    }
    if (!this.blackholed) pipe.end();
  }

  private retire(): void {
    if (this.gone) return;
    this.gone = true;
    this.up.clear();
    this.down.clear();
    if (this.blackholeTimer) clearTimeout(this.blackholeTimer);
    this.onGone(this);
  }
}

function checkMs(name: string, v: number, min = 0): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min) {
    throw new TetherError('ERR_BAD_CONFIG', `chaos option ${name} must be a number of ms >= ${min}, got ${shown(v)}`);
  }
  return v;
}

export class ChaosProxy extends EventEmitter {
  /** Faults injected so far, by kind (one per connection a fault was applied to). */
  readonly injected: Record<FaultKind, number> = { cut: 0, blackhole: 0, delay: 0, split: 0 };
  /** Random faults that found no live connection to hit. */
  missed = 0;
  /** Connections accepted so far. */
  accepted = 0;
  /** The last 1000 faults, oldest first, missed random ones included (in schedule order). */
  readonly recent: FaultRecord[] = [];
  readonly seed: number;
  private readonly pairs = new Set<Pair>();
  private readonly server: net.Server;
  private readonly rand: () => number;
  private readonly log: Logger;
  private readonly o: Required<Omit<ChaosOptions, 'logger' | 'seed'>>;
  private schedule: NodeJS.Timeout | null = null;
  private closed = false;

  private constructor(opts: ChaosOptions) {
    super();
    const port = opts.targetPort;
    if (!Number.isInteger(port) || port < 1 || port > 65535) {
      throw new TetherError('ERR_BAD_CONFIG', `chaos option targetPort must be a port number (1-65535), got ${JSON.stringify(port)}`);
    }
    const kinds = opts.kinds ?? [...FAULT_KINDS];
    if (kinds.length === 0 || kinds.some((k) => !FAULT_KINDS.includes(k))) {
      throw new TetherError('ERR_BAD_CONFIG', `chaos option kinds must be a non-empty list of ${FAULT_KINDS.join(', ')}, got ${JSON.stringify(kinds)}`);
    }
    this.o = {
      listenHost: opts.listenHost ?? CHAOS_DEFAULTS.listenHost,
      listenPort: opts.listenPort ?? CHAOS_DEFAULTS.listenPort,
      targetHost: opts.targetHost ?? CHAOS_DEFAULTS.targetHost,
      targetPort: port,
      every: checkMs('every', opts.every ?? CHAOS_DEFAULTS.every),
      kinds,
      blackholeMs: checkMs('blackholeMs', opts.blackholeMs ?? CHAOS_DEFAULTS.blackholeMs, 1),
      delayMs: checkMs('delayMs', opts.delayMs ?? CHAOS_DEFAULTS.delayMs, 1),
      delayForMs: checkMs('delayForMs', opts.delayForMs ?? CHAOS_DEFAULTS.delayForMs, 1),
      splitMs: checkMs('splitMs', opts.splitMs ?? CHAOS_DEFAULTS.splitMs, 1),
    };
    this.seed = (opts.seed ?? Math.floor(Math.random() * 2 ** 32)) >>> 0;
    this.rand = prng(this.seed);
    this.log = opts.logger ?? silentLogger;
    this.server = net.createServer((a) => this.onDevice(a));
    this.server.on('error', (err) => this.log.error('chaos proxy listener error', { err }));
  }

  /** Starts listening and, with `every` > 0, the random schedule. */
  static async start(opts: ChaosOptions): Promise<ChaosProxy> {
    const p = new ChaosProxy(opts);
    await new Promise<void>((resolve, reject) => {
      const fail = (err: NodeJS.ErrnoException) =>
        reject(new Error(`chaos proxy cannot listen on ${p.o.listenHost}:${p.o.listenPort} (${err.code ?? err.message})`));
      p.server.once('error', fail);
      p.server.listen(p.o.listenPort, p.o.listenHost, () => {
        p.server.off('error', fail);
        resolve();
      });
    });
    p.log.info('chaos proxy listening', {
      listen: `${p.o.listenHost}:${p.port}`,
      target: `${p.o.targetHost}:${p.o.targetPort}`,
      seed: p.seed,
      every: p.o.every,
      kinds: p.o.kinds.join(','),
    });
    p.scheduleNext();
    return p;
  }

  /** The port devices connect to. */
  get port(): number {
    return (this.server.address() as net.AddressInfo | null)?.port ?? 0;
  }

  /** Open connections that pass bytes (not blackholed). */
  get live(): number {
    let n = 0;
    for (const p of this.pairs) if (p.live) n++;
    return n;
  }

  /** Every fault injected so far. */
  get total(): number {
    return this.injected.cut + this.injected.blackhole + this.injected.delay + this.injected.split;
  }

  /** Chunks held back right now by delays and splits. */
  get held(): number {
    let n = 0;
    for (const p of this.pairs) n += p.up.heldChunks + p.down.heldChunks;
    return n;
  }

  /** Destroys every live connection at once. Returns how many. */
  cut(): number {
    return this.each((p) => this.apply(p, 'cut'));
  }

  /** Drops every byte of every live connection for `ms` (then cuts it), or for good without `ms`. */
  blackhole(ms?: number): number {
    if (ms !== undefined) checkMs('blackhole ms', ms, 1);
    return this.each((p) => this.apply(p, 'blackhole', ms));
  }

  /** Holds every chunk of every live connection back by `ms`, for `forMs`. */
  delay(ms: number, forMs: number): number {
    checkMs('delay ms', ms, 1);
    checkMs('delay forMs', forMs, 1);
    return this.each((p) => this.apply(p, 'delay', forMs, ms));
  }

  /** Delivers every chunk of every live connection one byte at a time, for `forMs`. */
  split(forMs: number): number {
    checkMs('split forMs', forMs, 1);
    return this.each((p) => this.apply(p, 'split', forMs));
  }

  /**
   * Stops the random schedule and ends the faults in progress: blackholed
   * connections are cut, delays and splits end and what they hold goes out now, in order.
   */
  calm(): void {
    if (this.schedule) clearTimeout(this.schedule);
    this.schedule = null;
    for (const p of [...this.pairs]) {
      if (p.blackholed) p.cut();
      p.delayUntil = p.splitUntil = 0;
      p.up.release();
      p.down.release();
    }
  }

  /** Stops everything: the schedule, every connection, the listener. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.schedule) clearTimeout(this.schedule);
    this.schedule = null;
    for (const p of [...this.pairs]) p.cut();
    await new Promise<void>((r) => this.server.close(() => r()));
  }

  private onDevice(a: net.Socket): void {
    if (this.closed) {
      a.destroy();
      return;
    }
    this.accepted++;
    const b = net.connect({ host: this.o.targetHost, port: this.o.targetPort });
    const pair = new Pair(a, b, (p) => this.pairs.delete(p));
    this.pairs.add(pair);
  }

  private each(f: (p: Pair) => void): number {
    let n = 0;
    for (const p of [...this.pairs]) {
      if (!p.live) continue;
      f(p);
      n++;
    }
    return n;
  }

  private apply(p: Pair, kind: FaultKind, forMs?: number, delayMs?: number): void {
    const now = Date.now();
    switch (kind) {
      case 'cut':
        p.cut();
        break;
      case 'blackhole':
        p.blackhole(forMs);
        break;
      case 'delay':
        p.delayMs = delayMs!;
        p.delayUntil = now + forMs!;
        break;
      case 'split':
        p.splitUntil = now + forMs!;
        break;
    }
    this.injected[kind]++;
    this.remember(kind, p.name);
    const fields: Record<string, unknown> = { kind, conn: p.name };
    if (forMs !== undefined) fields.forMs = forMs;
    if (delayMs !== undefined) fields.delayMs = delayMs;
    this.log.info('chaos: fault injected', fields);
    this.emit('fault', kind, p.name);
  }

  private remember(kind: FaultKind, conn: string | null): void {
    if (this.recent.length >= RECENT) this.recent.shift();
    this.recent.push({ at: Date.now(), kind, conn });
  }

  private scheduleNext(): void {
    if (this.closed || this.o.every <= 0) return;
    const wait = this.o.every * (0.5 + this.rand());
    this.schedule = setTimeout(() => {
      this.schedule = null;
      this.randomFault();
      this.scheduleNext();
    }, wait);
    this.schedule.unref();
  }

  private randomFault(): void {
    const kind = this.o.kinds[Math.floor(this.rand() * this.o.kinds.length)];
    const pick = this.rand();
    const live = [...this.pairs].filter((p) => p.live);
    if (live.length === 0) {
      this.missed++;
      this.log.debug('chaos: no live connection for a random fault', { kind });
      this.remember(kind, null);
      this.emit('missed', kind);
      return;
    }
    const p = live[Math.floor(pick * live.length)];
    const o = this.o;
    if (kind === 'blackhole') this.apply(p, kind, o.blackholeMs);
    else if (kind === 'delay') this.apply(p, kind, o.delayForMs, o.delayMs);
    else if (kind === 'split') this.apply(p, kind, o.splitMs);
    else this.apply(p, kind);
  }
}
