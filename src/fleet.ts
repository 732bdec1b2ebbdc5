/**
 * The fleet: every Connection of a Server seen as a device with a type, metadata,
 * status and telemetry, addressed one by one, by type, or all at once.
 *
 * A device's type is the one it declared in its ID line (`id##type##{json}`),
 * else the first type in the configuration whose patterns match its ID (exact
 * IDs or globs with `*` and `?`), else null.
 */
import { EventEmitter, setMaxListeners } from 'node:events';
import type { AppStatus } from './apps';
import type { Connection } from './connection';
import { checkInt, Counters } from './endpoint';
import { lineTooLongForLink, TetherError, TetherErrorCode } from './errors';
import type { Link } from './link';
import { normalizePayload, payloadProblem } from './protocol';
import type { Server } from './server';
import type { Sample } from './telemetry';

export type DeviceTypes = Record<string, string[]>;

export interface DeviceInfo {
  id: string;
  type: string | null;
  meta: Record<string, unknown>;
  status: 'up' | 'down' | 'closed';
  /** Where its current link comes from (tcp:… or mesh:…), if up. */
  remote: string | null;
  /** ms since the epoch of the last byte received; null if never. */
  lastSeen: number | null;
  counters: Counters;
  /** Latest value of each telemetry name. */
  telemetry: Record<string, Sample>;
  /** Received lines waiting for the app, and messages held un-ACKed behind them. */
  buffered: number;
  held: number;
  /** The receive buffer is full and nothing has been read for a while: nobody is reading this device. */
  stalled: boolean;
  /** The app instances serving this device (empty without apps: its lines are accepted and shown). */
  apps: AppStatus[];
}

export interface SendOptions {
  /** ms to wait for the device's ACK before reporting `failed` (the line is then abandoned), counted from the call. Default 10000. */
  timeout?: number;
  /** Resolve as soon as the line is queued (`accepted`) instead of when ACKed (`delivered`). Default false. */
  accepted?: boolean;
}

export interface SendOutcome {
  id: string;
  status: 'delivered' | 'accepted' | 'failed';
  error?: string;
  /** With `failed`, when the reason has one: `ERR_BUSY` (see FleetOptions), `ERR_LINE_TOO_LONG`, `ERR_ABORTED` (timeout), `ERR_CLOSED`… */
  code?: TetherErrorCode;
}

export interface FleetOptions {
  /**
   * Per-device sends held at once. Every device a send or broadcast addresses
   * holds one from the call until its outcome (for devices that are down: until
   * its timeout), about 2 KB of heap each; a broadcast to N devices holds N. A
   * call that would go past it is refused whole (`ERR_BUSY`). Default 100000.
   */
  maxPendingSends?: number;
  /** Bytes of line text those sends hold, counted once per device addressed. Default 64 MiB. */
  maxPendingBytes?: number;
}

export const FLEET_DEFAULTS = { maxPendingSends: 100_000, maxPendingBytes: 64 * 1024 * 1024 } as const;

/** Devices a broadcast addresses per event-loop turn: a big fleet is addressed in slices, and device links are served in between. */
export const FANOUT_SLICE = 250;

/**
 * Devices of a broadcast that share one abort signal. Not one signal for all:
 * Node's EventTarget compares a new listener with every listener it holds, so
 * N writes on one signal cost N² (minutes at 100,000 devices).
 */
const SIGNAL_GROUP = 32;

/** The timeout of a fan-out: one timer, and an abort signal per SIGNAL_GROUP devices. */
class Deadline {
  private readonly groups: AbortController[] = [];
  private readonly timer: NodeJS.Timeout;
  private reason: unknown = null;

  constructor(ms: number) {
    this.timer = setTimeout(() => {
      this.reason = new DOMException('The operation was aborted due to timeout', 'TimeoutError');
      for (const c of this.groups) c?.abort(this.reason);
    }, ms);
    this.timer.unref?.();
  }

  /** The signal of the `i`-th device (already aborted if the time is up). */
  signal(i: number): AbortSignal {
    if (this.reason !== null) return AbortSignal.abort(this.reason);
    const g = Math.floor(i / SIGNAL_GROUP);
    let c = this.groups[g];
    if (!c) {
      c = this.groups[g] = new AbortController();
      setMaxListeners(0, c.signal); // up to two listeners per device of the group
    }
    return c.signal;
  }

  /** Every outcome is in: the timer is not needed any more. */
  cancel(): void {
    clearTimeout(this.timer);
  }
}

/** Longest `timeout` of a send, ms (what a timer can hold). */
const MAX_SEND_TIMEOUT = 2 ** 31 - 1;

/**
 * A send or broadcast refused because the sends already waiting for devices
 * hold as much as the fleet allows (maxPendingSends, maxPendingBytes). Nothing
 * was sent; retry later.
 */
export class FleetBusyError extends TetherError {
  constructor(
    /** Per-device sends and bytes the refused call asked for. */
    readonly wanted: { sends: number; bytes: number },
    /** What was held when it was refused. */
    readonly held: { sends: number; bytes: number },
    readonly limits: { maxPendingSends: number; maxPendingBytes: number },
  ) {
    const mb = (b: number) => (b < 1024 ? `${b} bytes` : b < 2 ** 20 ? `${(b / 1024).toFixed(1)} KiB` : `${(b / 2 ** 20).toFixed(1)} MiB`);
    const which =
      held.sends + wanted.sends > limits.maxPendingSends
        ? `${held.sends} sends are waiting for devices and this one needs ${wanted.sends} more (maxPendingSends ${limits.maxPendingSends})`
        : `${mb(held.bytes)} of lines are waiting for devices and this one needs ${mb(wanted.bytes)} more (maxPendingBytes ${mb(limits.maxPendingBytes)})`;
    super(
      'ERR_BUSY',
      `too many messages waiting for devices, nothing was sent: ${which}. Retry once some are answered ` +
        '(a device that is down holds its share until the timeout, so a shorter "timeout" frees it sooner), ' +
        'address fewer devices at once, or raise maxPendingSends / maxPendingBytes if the server has the memory (about 2 KB per send plus the line).',
    );
    this.name = 'FleetBusyError';
  }
}

/** A fan-out in progress: its devices are addressed in slices, in call order. */
interface FanOut {
  conns: Connection[];
  next: number;
  line: string;
  bytes: number;
  deadline: Deadline;
  timeout: number;
  accepted: boolean;
  outcomes: Array<Promise<SendOutcome>>;
  done(): void;
}

/** Compiles an exact ID or a glob (`*` any run, `?` one character) to a matcher. */
export function globMatcher(pattern: string): (id: string) => boolean {
  if (!/[*?]/.test(pattern)) return (id) => id === pattern;
  const re = new RegExp('^' + pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.') + '$', 's');
  return (id) => re.test(id);
}

export class Fleet extends EventEmitter {
  private readonly matchers: Array<{ type: string; match: (id: string) => boolean }> = [];
  private appStatus: (id: string) => AppStatus[] = () => [];
  readonly maxPendingSends: number;
  readonly maxPendingBytes: number;
  private heldSends = 0;
  private heldBytes = 0;
  /** Fan-outs still addressing their devices, oldest first; sends wait behind them so every device gets lines in call order. */
  private readonly fanouts: FanOut[] = [];
  private slicing: NodeJS.Immediate | null = null;
  /** The line limit announced by each device's latest link (a mesh node: one frame), and where it came from. */
  private readonly linkLimits = new WeakMap<Connection, { limit: number; remote: string }>();

  constructor(
    readonly server: Server,
    types: DeviceTypes = {},
    opts: FleetOptions = {},
  ) {
    super();
    this.maxPendingSends = checkInt('maxPendingSends', opts.maxPendingSends ?? FLEET_DEFAULTS.maxPendingSends, 1);
    this.maxPendingBytes = checkInt('maxPendingBytes', opts.maxPendingBytes ?? FLEET_DEFAULTS.maxPendingBytes, 1024);
    server.on('attach', (c: Connection, link: Link) => {
      if (link.maxLineLength !== undefined) this.linkLimits.set(c, { limit: link.maxLineLength, remote: link.remote });
      else this.linkLimits.delete(c);
    });
    for (const [type, patterns] of Object.entries(types)) {
      if (!Array.isArray(patterns) || patterns.some((p) => typeof p !== 'string' || !p)) {
        throw new TetherError('ERR_BAD_CONFIG', `types.${type} must be a list of client IDs or glob patterns, e.g. ["lamp-*"]`);
      }
      for (const p of patterns) this.matchers.push({ type, match: globMatcher(p) });
    }
    for (const c of server.connections()) this.watch(c);
    server.on('connection', (c: Connection) => this.watch(c));
  }

  /** Used by the AppRunner: where describe() finds the app instances of a device. */
  setAppStatus(lookup: (id: string) => AppStatus[]): void {
    this.appStatus = lookup;
  }

  /** Used by the AppRunner: an app instance of `id` changed state (emits `app`). */
  appChanged(id: string, status: AppStatus): void {
    const c = this.server.get(id);
    if (c) this.fire('app', c, status);
  }

  /** The device's type: declared in its ID line, else from the configured patterns, else null. */
  typeOf(conn: Connection | string): string | null {
    const c = typeof conn === 'string' ? this.server.get(conn) : conn;
    const id = typeof conn === 'string' ? conn : conn.id;
    if (c?.declaredType) return c.declaredType;
    return this.matchers.find((m) => m.match(id))?.type ?? null;
  }

  info(id: string): DeviceInfo | undefined {
    const c = this.server.get(id);
    return c ? this.describe(c) : undefined;
  }

  /** Every device the server has seen, optionally only one type / status. */
  list(filter: { type?: string; status?: DeviceInfo['status'] } = {}): DeviceInfo[] {
    return this.server
      .connections()
      .map((c) => this.describe(c))
      .filter((d) => (filter.type === undefined || d.type === filter.type) && (filter.status === undefined || d.status === filter.status));
  }

  /** IDs of the devices of `type` (the ones the server has seen). */
  idsOfType(type: string): string[] {
    return this.server
      .connections()
      .filter((c) => this.typeOf(c) === type)
      .map((c) => c.id);
  }

  /** Per-device sends (and bytes of their lines) waiting for an outcome right now; bounded by maxPendingSends / maxPendingBytes. */
  get pendingSends(): { sends: number; bytes: number } {
    return { sends: this.heldSends, bytes: this.heldBytes };
  }

  /**
   * Sends one qos line to one device; never throws, reports the outcome. When the
   * sends already waiting hold maxPendingSends / maxPendingBytes, it fails at once
   * with `code: 'ERR_BUSY'` (nothing sent).
   */
  send(id: string, line: string, opts: SendOptions = {}): Promise<SendOutcome> {
    const conn = this.server.get(id);
    if (!conn || conn.isClosed) return Promise.resolve({ id, status: 'failed', error: 'no such device (it has never connected)' });
    let timeout: number;
    try {
      timeout = sendTimeout(opts);
    } catch (e) {
      return Promise.reject(e); // a wrong option is the caller's bug, not an outcome
    }
    const bytes = Buffer.byteLength(line);
    const refused = this.reserve(1, bytes);
    if (refused) return Promise.resolve({ id, status: 'failed', error: refused.message, code: refused.code });
    // Behind a broadcast still addressing its devices, so this device gets the two lines in call order.
    if (this.fanouts.length > 0) return this.fanOut([conn], line, bytes, timeout, opts.accepted === true).then((o) => o[0]);
    return this.deliver(conn, line, bytes, AbortSignal.timeout(timeout), timeout, opts.accepted === true);
  }

  /**
   * Sends to every device of `type`; one outcome per device. Rejects with
   * FleetBusyError (`ERR_BUSY`, nothing sent) when that many sends would pass
   * maxPendingSends / maxPendingBytes.
   */
  sendType(type: string, line: string, opts: SendOptions = {}): Promise<SendOutcome[]> {
    return this.sendMany(
      this.server.connections().filter((c) => this.typeOf(c) === type),
      line,
      opts,
    );
  }

  /** Sends to every device the server has seen; one outcome per device. Rejects like sendType(). */
  sendAll(line: string, opts: SendOptions = {}): Promise<SendOutcome[]> {
    return this.sendMany(this.server.connections(), line, opts);
  }

  /** The fan-out of a broadcast: admitted whole or refused whole, then addressed in slices. */
  private sendMany(conns: Connection[], line: string, opts: SendOptions): Promise<SendOutcome[]> {
    let timeout: number;
    try {
      timeout = sendTimeout(opts);
    } catch (e) {
      return Promise.reject(e);
    }
    const bytes = Buffer.byteLength(line);
    const refused = this.reserve(conns.length, bytes * conns.length);
    if (refused) return Promise.reject(refused);
    return this.fanOut(conns, line, bytes, timeout, opts.accepted === true);
  }

  /** Holds `n` sends of `bytes` in total, or says why not. */
  private reserve(n: number, bytes: number): FleetBusyError | null {
    if (n === 0) return null;
    if (this.heldSends + n > this.maxPendingSends || this.heldBytes + bytes > this.maxPendingBytes) {
      return new FleetBusyError(
        { sends: n, bytes },
        { sends: this.heldSends, bytes: this.heldBytes },
        { maxPendingSends: this.maxPendingSends, maxPendingBytes: this.maxPendingBytes },
      );
    }
    this.heldSends += n;
    this.heldBytes += bytes;
    return null;
  }

  /** Queues devices (already reserved) to be addressed in call order, FANOUT_SLICE per event-loop turn. */
  private fanOut(conns: Connection[], line: string, bytes: number, timeout: number, accepted: boolean): Promise<SendOutcome[]> {
    // One timer for the whole broadcast, however many devices wait on it.
    const deadline = new Deadline(timeout);
    return new Promise<SendOutcome[]>((resolve) => {
      const job: FanOut = {
        conns,
        next: 0,
        line,
        bytes,
        deadline,
        timeout,
        accepted,
        outcomes: [],
        done: () =>
          resolve(
            Promise.all(job.outcomes).then((o) => {
              deadline.cancel();
              return o;
            }),
          ),
      };
      this.fanouts.push(job);
      // The first slice goes now: a broadcast to a small fleet is addressed at once, as before.
      if (this.fanouts.length === 1) this.slice();
    });
  }

  private readonly slice = (): void => {
    this.slicing = null;
    let room = FANOUT_SLICE;
    while (room > 0 && this.fanouts.length > 0) {
      const job = this.fanouts[0];
      while (room > 0 && job.next < job.conns.length) {
        const i = job.next++;
        job.outcomes.push(this.deliver(job.conns[i], job.line, job.bytes, job.deadline.signal(i), job.timeout, job.accepted));
        room--;
      }
      if (job.next < job.conns.length) break;
      this.fanouts.shift();
      job.done();
    }
    if (this.fanouts.length > 0) this.slicing = setImmediate(this.slice);
  };

  /** Writes the line to one device whose share is reserved; releases the share when the outcome is known. */
  private deliver(conn: Connection, line: string, bytes: number, signal: AbortSignal, timeout: number, accepted: boolean): Promise<SendOutcome> {
    const id = conn.id;
    const release = () => {
      this.heldSends--;
      this.heldBytes -= bytes;
    };
    const link = this.linkLimits.get(conn);
    if (link && payloadProblem(normalizePayload(line), link.limit) === 'too-long') {
      release();
      const err = lineTooLongForLink(Buffer.byteLength(normalizePayload(line)) + 2, link.limit, link.remote);
      return Promise.resolve({ id, status: 'failed', error: err.message, code: err.code });
    }
    let written: Promise<void>;
    // An accepted line is held until its delivery ends, not only until it is queued.
    const onSettled = accepted ? release : undefined;
    try {
      written = conn.write(line, { signal, accepted, onSettled });
    } catch (e) {
      written = Promise.reject(e);
    }
    return written.then(
      (): SendOutcome => {
        if (!accepted) release();
        return { id, status: accepted ? 'accepted' : 'delivered' };
      },
      (e: unknown): SendOutcome => {
        release();
        const err = e as TetherError;
        const error =
          err.code === 'ERR_ABORTED'
            ? `not acknowledged within ${timeout} ms (device ${conn.isUp ? 'up' : 'down'}); the line was abandoned`
            : (err?.message ?? String(e));
        return err instanceof TetherError ? { id, status: 'failed', error, code: err.code } : { id, status: 'failed', error };
      },
    );
  }

  describe(c: Connection): DeviceInfo {
    return {
      id: c.id,
      type: this.typeOf(c),
      meta: c.meta,
      status: c.state,
      remote: c.remote ?? null,
      lastSeen: c.lastSeen || null,
      counters: { ...c.counters },
      telemetry: c.telemetry.snapshot(),
      buffered: c.buffered,
      held: c.heldMessages,
      stalled: c.stalled,
      apps: this.appStatus(c.id),
    };
  }

  /** Emits `name` and `name:type` (e.g. `message:light`); the snapshot is built once, and only if someone listens. */
  private fire(name: string, c: Connection, ...args: unknown[]): void {
    const type = this.typeOf(c);
    const typed = type === null ? null : `${name}:${type}`;
    const plain = this.listenerCount(name) > 0;
    const byType = typed !== null && this.listenerCount(typed) > 0;
    if (!plain && !byType) return;
    const info = this.describe(c);
    if (plain) this.emit(name, info, ...args);
    if (byType) this.emit(typed!, info, ...args);
  }

  private watch(c: Connection): void {
    c.on('up', () => this.fire('connect', c));
    c.on('down', (reason: string) => this.fire('disconnect', c, reason));
    c.on('line', (line: string) => this.fire('message', c, line.trimEnd()));
    c.on('telemetry', (name: string, value: unknown, t: number) => this.fire('telemetry', c, name, value, t));
    c.on('stalled', (on: boolean) => this.fire('stalled', c, on));
    // A Connection is created on its first link: report that first connect too.
    if (c.isUp) this.fire('connect', c);
  }
}

/** The `timeout` of a send, checked: a whole number of ms a timer can hold. */
function sendTimeout(opts: SendOptions): number {
  return checkInt('timeout', opts.timeout ?? 10_000, 1, MAX_SEND_TIMEOUT);
}
