/**
 * The fleet: every Connection of a Server seen as a device with a type, metadata,
 * status and telemetry, addressed one by one, by type, or all at once.
 *
 * A device's type is the one it declared in its ID line (`id##type##{json}`),
 * else the first type in the configuration whose patterns match its ID (exact
 * IDs or globs with `*` and `?`), else null.
 */
import { EventEmitter } from 'node:events';
import type { Connection } from './connection';
import type { Counters } from './endpoint';
import { TetherError } from './errors';
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
}

export interface SendOptions {
  /** ms to wait for the device's ACK before reporting `failed` (the line is then abandoned). Default 10000. */
  timeout?: number;
  /** Resolve as soon as the line is queued (`accepted`) instead of when ACKed (`delivered`). Default false. */
  accepted?: boolean;
}

export interface SendOutcome {
  id: string;
  status: 'delivered' | 'accepted' | 'failed';
  error?: string;
}

/** Compiles an exact ID or a glob (`*` any run, `?` one character) to a matcher. */
export function globMatcher(pattern: string): (id: string) => boolean {
  if (!/[*?]/.test(pattern)) return (id) => id === pattern;
  const re = new RegExp('^' + pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.') + '$', 's');
  return (id) => re.test(id);
}

export class Fleet extends EventEmitter {
  private readonly matchers: Array<{ type: string; match: (id: string) => boolean }> = [];

  constructor(
    readonly server: Server,
    types: DeviceTypes = {},
  ) {
    super();
    for (const [type, patterns] of Object.entries(types)) {
      if (!Array.isArray(patterns) || patterns.some((p) => typeof p !== 'string' || !p)) {
        throw new TetherError('ERR_BAD_CONFIG', `types.${type} must be a list of client IDs or glob patterns, e.g. ["lamp-*"]`);
      }
      for (const p of patterns) this.matchers.push({ type, match: globMatcher(p) });
    }
    for (const c of server.connections()) this.watch(c);
    server.on('connection', (c: Connection) => this.watch(c));
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

  /** Sends one qos line to one device; never throws, reports the outcome. */
  async send(id: string, line: string, opts: SendOptions = {}): Promise<SendOutcome> {
    const conn = this.server.get(id);
    if (!conn || conn.isClosed) return { id, status: 'failed', error: 'no such device (it has never connected)' };
    const signal = AbortSignal.timeout(opts.timeout ?? 10000);
    try {
      await conn.write(line, { signal, accepted: opts.accepted });
      return { id, status: opts.accepted ? 'accepted' : 'delivered' };
    } catch (e) {
      const err = e as TetherError;
      const error =
        err.code === 'ERR_ABORTED'
          ? `not acknowledged within ${opts.timeout ?? 10000} ms (device ${conn.isUp ? 'up' : 'down'}); the line was abandoned`
          : err.message;
      return { id, status: 'failed', error };
    }
  }

  /** Sends to every device of `type`; one outcome per device. */
  sendType(type: string, line: string, opts: SendOptions = {}): Promise<SendOutcome[]> {
    return Promise.all(this.idsOfType(type).map((id) => this.send(id, line, opts)));
  }

  /** Sends to every device the server has seen; one outcome per device. */
  sendAll(line: string, opts: SendOptions = {}): Promise<SendOutcome[]> {
    return Promise.all(this.server.connections().map((c) => this.send(c.id, line, opts)));
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
    // A Connection is created on its first link: report that first connect too.
    if (c.isUp) this.fire('connect', c);
  }
}
