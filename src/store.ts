/**
 * Durable state of Connections (opt-in, `persist` in the config): an
 * append-only journal per client ID, so that qos messages accepted by the
 * server, the message-id counter, the duplicate ring and received lines the app
 * has not taken yet all survive a crash or restart of the server process.
 *
 * Why a journal and not a database: no server to run, no native module to
 * build, one sequential synchronous write per event (cheap, and ordered before
 * the bytes it protects go on the wire), and a format a person can read. Each
 * file is compacted into a single snapshot record when it grows.
 *
 * File: `<dir>/<encodeURIComponent(id)>.jsonl`, one JSON object per line:
 *   {"S": {...}}          snapshot of the whole state (first line after compaction)
 *   {"q": [key, payload, wait]}   qos message accepted, not yet sent
 *   {"m": [key, mid]}     it went on the wire with this message id
 *   {"a": key}            the peer ACKed it
 *   {"d": key}            the writer gave up on it (aborted)
 *   {"r": [mid, payload]} a message line received (new or repeat, in order)
 *   {"t": 1}              the app took the oldest received line
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { TetherError } from './errors';
import type { Logger } from './log';
import { ReceiveFilter } from './protocol';

export interface OutboundRecord {
  key: number;
  payload: string;
  wait: boolean;
  /** Set once it was sent: it must be resent with the same id. */
  mid?: number;
}

/** What a Connection gets back after a restart. */
export interface RestoredState {
  /** Next message id to use (never 0 once anything was sent). */
  nextMid: number;
  nextKey: number;
  ring: Uint8Array;
  lastMid0: string | null;
  /** Accepted qos messages not yet ACKed, in the order they were accepted. */
  outbound: OutboundRecord[];
  /** Received lines the app had not taken, oldest first. */
  inbound: string[];
}

/** The events a Connection reports, each written before its effect is visible to the peer. */
export interface Journal {
  queued(key: number, payload: string, wait: boolean): void;
  sent(key: number, mid: number): void;
  acked(key: number): void;
  dropped(key: number): void;
  /** Every received message line; returns whether it is new (the journal owns the filter's copy). */
  received(mid: number, payload: string): void;
  taken(): void;
  close(): void;
}

export interface StoreOptions {
  /** Folder for the journals; created if missing. */
  dir: string;
  /** fsync after every record: survives power loss too, at a large cost per message. Default false (survives a process crash). */
  fsync?: boolean;
  /** Records appended before a journal is compacted into one snapshot. Default 2000. */
  compactEvery?: number;
  logger?: Logger;
}

/** The live mirror of one client's durable state. */
class State {
  nextMid = 0;
  nextKey = 1;
  readonly filter = new ReceiveFilter();
  readonly outbound = new Map<number, OutboundRecord>();
  readonly inbound: string[] = [];

  apply(rec: Record<string, unknown>): void {
    if ('S' in rec) {
      const snap = rec.S as {
        nextMid: number;
        nextKey: number;
        ring: string;
        lastMid0: string | null;
        outbound: OutboundRecord[];
        inbound: string[];
      };
      this.nextMid = snap.nextMid;
      this.nextKey = snap.nextKey;
      this.filter.ring.restore(Buffer.from(snap.ring, 'hex'));
      this.filter.lastMid0 = snap.lastMid0;
      this.outbound.clear();
      for (const o of snap.outbound) this.outbound.set(o.key, o);
      this.inbound.splice(0, this.inbound.length, ...snap.inbound);
    } else if ('q' in rec) {
      const [key, payload, wait] = rec.q as [number, string, boolean];
      this.outbound.set(key, { key, payload, wait });
      this.nextKey = Math.max(this.nextKey, key + 1);
    } else if ('m' in rec) {
      const [key, mid] = rec.m as [number, number];
      const o = this.outbound.get(key);
      if (o) o.mid = mid;
      this.nextMid = mid >= 255 ? 1 : mid + 1;
    } else if ('a' in rec) {
      this.outbound.delete(rec.a as number);
    } else if ('d' in rec) {
      this.outbound.delete(rec.d as number);
    } else if ('r' in rec) {
      const [mid, payload] = rec.r as [number, string];
      if (this.filter.accept(mid, payload)) this.inbound.push(payload);
    } else if ('t' in rec) {
      this.inbound.shift();
    } else {
      throw new Error(`unknown record ${JSON.stringify(rec).slice(0, 80)}`);
    }
  }

  snapshot(): Record<string, unknown> {
    return {
      S: {
        nextMid: this.nextMid,
        nextKey: this.nextKey,
        ring: Buffer.from(this.filter.ring.snapshot()).toString('hex'),
        lastMid0: this.filter.lastMid0,
        outbound: [...this.outbound.values()],
        inbound: this.inbound,
      },
    };
  }

  restored(): RestoredState {
    return {
      nextMid: this.nextMid,
      nextKey: this.nextKey,
      ring: this.filter.ring.snapshot(),
      lastMid0: this.filter.lastMid0,
      outbound: [...this.outbound.values()].map((o) => ({ ...o })),
      inbound: [...this.inbound],
    };
  }
}

export class FileStore {
  readonly dir: string;
  private readonly fsync: boolean;
  private readonly compactEvery: number;
  private readonly log?: Logger;
  private readonly open = new Map<string, FileJournal>();

  constructor(opts: StoreOptions) {
    this.dir = path.resolve(opts.dir);
    this.fsync = opts.fsync ?? false;
    this.compactEvery = opts.compactEvery ?? 2000;
    this.log = opts.logger;
    try {
      fs.mkdirSync(this.dir, { recursive: true });
      fs.accessSync(this.dir, fs.constants.W_OK);
    } catch (e) {
      throw new TetherError(
        'ERR_BAD_CONFIG',
        `persist: cannot use ${this.dir} (${(e as NodeJS.ErrnoException).code ?? e}): choose a writable folder`,
      );
    }
  }

  fileOf(id: string): string {
    return path.join(this.dir, encodeURIComponent(id) + '.jsonl');
  }

  /** Client IDs with a journal. */
  ids(): string[] {
    return fs
      .readdirSync(this.dir)
      .filter((f) => f.endsWith('.jsonl'))
      .map((f) => decodeURIComponent(f.slice(0, -6)));
  }

  /**
   * Opens the journal of `id` (one open journal per ID), returning what it held
   * (null if there was nothing) and the journal to write to from now on.
   */
  attach(id: string): { restored: RestoredState | null; journal: Journal } {
    if (this.open.has(id)) throw new Error(`journal of ${JSON.stringify(id)} is already open`);
    const file = this.fileOf(id);
    const state = new State();
    let had = false;
    if (fs.existsSync(file)) {
      had = true;
      const lines = fs.readFileSync(file, 'utf8').split('\n');
      if (lines[lines.length - 1] === '') lines.pop();
      lines.forEach((line, i) => {
        let rec: Record<string, unknown>;
        try {
          rec = JSON.parse(line);
        } catch {
          if (i === lines.length - 1) {
            // The process died while writing this line; its effect never reached the peer.
            this.log?.warn('journal: ignored a torn last record', { client: id, file });
            return;
          }
          throw new TetherError(
            'ERR_BAD_CONFIG',
            `persist: journal ${file} is damaged at line ${i + 1}: move the file away to start this client afresh`,
          );
        }
        state.apply(rec);
      });
    }
    const journal = new FileJournal(this, id, file, state, this.fsync, this.compactEvery);
    this.open.set(id, journal);
    if (had) {
      const r = state.restored();
      this.log?.info('journal restored', {
        client: id,
        outbound: r.outbound.length,
        inbound: r.inbound.length,
        nextMid: r.nextMid,
      });
      return { restored: r, journal };
    }
    return { restored: null, journal };
  }

  /** Deletes the journal of `id` (a Connection retired by its app starts afresh). */
  forget(id: string): void {
    this.open.get(id)?.close();
    fs.rmSync(this.fileOf(id), { force: true });
  }

  /** @internal */
  closed(id: string): void {
    this.open.delete(id);
  }

  closeAll(): void {
    for (const j of [...this.open.values()]) j.close();
  }
}

class FileJournal implements Journal {
  private fd: number;
  private records = 0;

  constructor(
    private readonly store: FileStore,
    private readonly id: string,
    private readonly file: string,
    private readonly state: State,
    private readonly fsync: boolean,
    private readonly compactEvery: number,
  ) {
    // Start every session from one snapshot: drops what earlier sessions piled up.
    this.fd = this.rewrite();
  }

  private append(rec: Record<string, unknown>): void {
    this.state.apply(rec);
    fs.writeSync(this.fd, JSON.stringify(rec) + '\n');
    if (this.fsync) fs.fsyncSync(this.fd);
    if (++this.records >= this.compactEvery) {
      fs.closeSync(this.fd);
      this.fd = this.rewrite();
    }
  }

  /** Writes the current state as one snapshot, atomically, and reopens for appending. */
  private rewrite(): number {
    const tmp = this.file + '.tmp';
    fs.writeFileSync(tmp, JSON.stringify(this.state.snapshot()) + '\n');
    if (this.fsync) {
      const fd = fs.openSync(tmp, 'r+');
      fs.fsyncSync(fd);
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, this.file);
    this.records = 0;
    return fs.openSync(this.file, 'a');
  }

  queued(key: number, payload: string, wait: boolean): void {
    this.append({ q: [key, payload, wait] });
  }

  sent(key: number, mid: number): void {
    this.append({ m: [key, mid] });
  }

  acked(key: number): void {
    this.append({ a: key });
  }

  dropped(key: number): void {
    this.append({ d: key });
  }

  received(mid: number, payload: string): void {
    this.append({ r: [mid, payload] });
  }

  taken(): void {
    this.append({ t: 1 });
  }

  close(): void {
    if (this.fd < 0) return;
    fs.closeSync(this.fd);
    this.fd = -1;
    this.store.closed(this.id);
  }
}
