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
 * File: `<dir>/<name>.jsonl` (see journalName: the URI-encoded ID when that is
 * short and plain, else a readable prefix plus a hash), one JSON object a line:
 *   {"S": {...}}          snapshot of the whole state (first line after compaction; holds the ID)
 *   {"q": [key, payload, wait]}   qos message accepted, not yet sent
 *   {"m": [key, mid]}     it went on the wire with this message id
 *   {"a": key}            the peer ACKed it
 *   {"d": key}            the writer gave up on it (aborted)
 *   {"n": [mid, payload]} a new message line received (it waits for the app)
 *   {"p": mid}            a repeat of a message already received (ACKed, not delivered: only the ring changes)
 *   {"r": [mid, payload]} (journals of earlier versions) a message line, new or repeat as the ring decides on replay
 *   {"t": 1}              the app took the oldest received line
 *   {"y": [type, meta]}   the type and metadata the device declared in its ID line
 *
 * Faults never leave this file as exceptions. A journal that cannot be read
 * back (bad JSON in the middle, a record of the wrong shape, a value out of
 * range) is renamed aside (`*.jsonl.damaged-<time>`), logged and counted, and
 * that device starts afresh. A journal that cannot be written (disk full, no
 * permission, out of file descriptors…) is "degraded": its device keeps working
 * in memory, the failure is logged (throttled) and counted, and the store
 * retries with a full snapshot until it succeeds. File descriptors are held for
 * at most `maxOpenFiles` journals (least recently used ones are closed).
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { TetherError } from './errors';
import { throttledError, throttledWarn } from './limits';
import type { Fields, Logger } from './log';
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
  /** Type the device last declared in its ID line, if any. */
  type?: string;
  /** Metadata the device last declared in its ID line, if any. */
  meta?: Record<string, unknown>;
}

/**
 * The events a Connection reports, each written before its effect is visible
 * to the peer. None of these methods throws: a failed write degrades the
 * journal (see `degraded`) and the Connection carries on in memory.
 */
export interface Journal {
  queued(key: number, payload: string, wait: boolean): void;
  sent(key: number, mid: number): void;
  acked(key: number): void;
  dropped(key: number): void;
  /**
   * Every received message line, new or repeat. `fresh`: the receiver's own
   * verdict (new = delivered); without it the journal decides with its copy of
   * the duplicate filter, which follows the links through FileStore.linked().
   */
  received(mid: number, payload: string, fresh?: boolean): void;
  taken(): void;
  close(): void;
  /** True while nothing reaches the disk for this device (a write failed; retried in the background). */
  readonly degraded: boolean;
}

export interface StoreOptions {
  /** Folder for the journals; created if missing. */
  dir: string;
  /** fsync after every record: survives power loss too, at a large cost per message. Default false (survives a process crash). */
  fsync?: boolean;
  /** Records appended before a journal is compacted into one snapshot. Default 2000. */
  compactEvery?: number;
  /**
   * Bytes appended before a journal is compacted into one snapshot (or the size
   * of its last snapshot, if that is larger). A journal file therefore never
   * exceeds its snapshot + max(compactBytes, snapshot) + one record. Default 1 MiB.
   */
  compactBytes?: number;
  /**
   * Journal files kept open at once; idle ones are closed and reopened when
   * needed. Default 256, and never more than a quarter of the process's
   * open-file limit (`ulimit -n`) unless set explicitly. Running out of file
   * descriptors anyway closes half of them and lowers the cap for the rest of the run.
   */
  maxOpenFiles?: number;
  logger?: Logger;
}

export const STORE_DEFAULTS = {
  fsync: false,
  compactEvery: 2000,
  compactBytes: 1024 * 1024,
  maxOpenFiles: 256,
} as const;

/** What the store has been through since it was created (for metrics, the API and the dashboard). */
export interface StoreStats {
  /** Journals this store holds (one per client ID with durable state), open file or not. */
  journals: number;
  /** Journal files open right now. */
  openFiles: number;
  /** The cap on open journal files (`maxOpenFiles`, lowered after the process ran out of descriptors). */
  maxOpenFiles: number;
  /** Journals whose device runs in memory only right now, because writing its journal failed. */
  degraded: number;
  /** Damaged or unreadable journals renamed aside since start. */
  quarantined: number;
  /** Journal writes (appends, snapshots, opens, renames, deletes) that failed since start. */
  writeFailures: number;
  /** Degraded journals that became writable again since start. */
  recovered: number;
  /** Snapshots written (compactions, first writes of a run, recoveries). */
  compactions: number;
}

/** A journal that cannot be trusted: the reason, with the 1-based line where it was found. */
export class JournalDamage extends Error {}

// ---- file names ------------------------------------------------------------

/** Longest URI-encoded ID kept as the file name itself; longer ones are hashed. */
const PLAIN_MAX = 160;
/** Characters of the encoded ID kept in front of the hash, for people reading the folder. */
const PREFIX_LEN = 40;
const EXT = '.jsonl';
/** Only what encodeURIComponent leaves plus `%`; `*` is left out (not allowed in names on some systems). */
const PLAIN_NAME = /^[A-Za-z0-9%._~!'()-]+$/;
/** Half of a surrogate pair on its own: not Unicode, cannot be URI-encoded. */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;
const LONE_SURROGATES = new RegExp(LONE_SURROGATE.source, 'g');

/**
 * The journal file name of a client ID: always a valid, bounded name (at most
 * 166 bytes, ASCII, no `/`), whatever the ID. Short plain IDs keep the name
 * earlier versions used (`encodeURIComponent(id).jsonl`); others become
 * `<first 40 encoded chars>+<sha-256 of the ID, 32 hex>.jsonl`. `+` never
 * appears in the plain form (it is encoded as %2B), so the two cannot clash.
 */
export function journalName(id: string): string {
  const wellFormed = !LONE_SURROGATE.test(id);
  const enc = encodeURIComponent(wellFormed ? id : id.replace(LONE_SURROGATES, '\uFFFD'));
  if (wellFormed && enc.length > 0 && enc.length <= PLAIN_MAX && PLAIN_NAME.test(enc)) {
    return enc + EXT;
  }
  // The hash covers the ID's UTF-16 code units, so two different strings never share a name.
  const hash = createHash('sha256').update(Buffer.from(id, 'utf16le')).digest('hex').slice(0, 32);
  const prefix = enc
    .slice(0, PREFIX_LEN)
    .replace(/%[0-9A-F]?$/, '')
    .replace(/\*/g, '%2A');
  return `${prefix}+${hash}${EXT}`;
}

/** The client ID a plain journal name stands for, or null for hashed (and foreign) names. */
export function idFromName(name: string): string | null {
  if (!name.endsWith(EXT) || name.includes('+')) return null;
  try {
    const id = decodeURIComponent(name.slice(0, -EXT.length));
    return id.length > 0 ? id : null;
  } catch {
    return null;
  }
}

// ---- options ---------------------------------------------------------------

function int(name: string, v: unknown, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw new TetherError(
      'ERR_BAD_CONFIG',
      `persist.${name} must be an integer from ${min} to ${max}, got ${JSON.stringify(v) ?? String(v)}: fix it in the config, or leave it out for the default (${STORE_DEFAULTS[name as keyof typeof STORE_DEFAULTS]})`,
    );
  }
  return v;
}

/** The store's options with their defaults, or ERR_BAD_CONFIG naming the one that is wrong and what it should be. */
export function checkStoreOptions(opts: StoreOptions): Required<Omit<StoreOptions, 'logger'>> {
  if (!opts || typeof opts !== 'object') {
    throw new TetherError('ERR_BAD_CONFIG', 'persist must be a folder path or { "dir": "./data", … }: fix it in the config');
  }
  if (typeof opts.dir !== 'string' || opts.dir.length === 0) {
    throw new TetherError('ERR_BAD_CONFIG', `persist.dir must be a folder path, got ${JSON.stringify(opts.dir) ?? String(opts.dir)}: e.g. "./data"`);
  }
  const fsync = opts.fsync ?? STORE_DEFAULTS.fsync;
  if (typeof fsync !== 'boolean') {
    throw new TetherError('ERR_BAD_CONFIG', `persist.fsync must be true or false, got ${JSON.stringify(fsync) ?? String(fsync)}: fix it in the config, or leave it out for the default (false)`);
  }
  return {
    dir: opts.dir,
    fsync,
    compactEvery: int('compactEvery', opts.compactEvery ?? STORE_DEFAULTS.compactEvery, 1, 1_000_000_000),
    compactBytes: int('compactBytes', opts.compactBytes ?? STORE_DEFAULTS.compactBytes, 4096, 2 ** 40),
    maxOpenFiles: int('maxOpenFiles', opts.maxOpenFiles ?? STORE_DEFAULTS.maxOpenFiles, 1, 1_000_000),
  };
}

// ---- records and their validation ---------------------------------------------

const isInt = (v: unknown, min: number, max: number): v is number => typeof v === 'number' && Number.isInteger(v) && v >= min && v <= max;
const isMid = (v: unknown): v is number => isInt(v, 0, 255);
const isKey = (v: unknown): v is number => isInt(v, 1, Number.MAX_SAFE_INTEGER);
/** What a line's payload can be: at least one character, no `\n`. */
const isPayload = (v: unknown): v is string => typeof v === 'string' && v.length > 0 && !v.includes('\n');
const isPlainObject = (v: unknown): v is Record<string, unknown> => !!v && typeof v === 'object' && !Array.isArray(v);
const RING_HEX = /^[0-9a-f]{64}$/;

function damage(why: string): never {
  throw new JournalDamage(why);
}

function only(o: Record<string, unknown>, what: string, allowed: string[]): void {
  for (const k of Object.keys(o)) if (!allowed.includes(k)) damage(`${what} has an unknown field "${k}"`);
}

function checkOutbound(o: unknown, i: number): OutboundRecord {
  if (!isPlainObject(o)) damage(`snapshot outbound[${i}] is not an object`);
  only(o, `snapshot outbound[${i}]`, ['key', 'payload', 'wait', 'mid']);
  if (!isKey(o.key)) damage(`snapshot outbound[${i}].key is not a positive integer`);
  if (!isPayload(o.payload)) damage(`snapshot outbound[${i}].payload is not a line`);
  if (typeof o.wait !== 'boolean') damage(`snapshot outbound[${i}].wait is not true or false`);
  if (o.mid !== undefined && !isMid(o.mid)) damage(`snapshot outbound[${i}].mid is not a message id (0-255)`);
  return o.mid === undefined ? { key: o.key, payload: o.payload, wait: o.wait } : { key: o.key, payload: o.payload, wait: o.wait, mid: o.mid };
}

/** A snapshot's fields, checked one by one. */
interface Snapshot {
  id?: string;
  nextMid: number;
  nextKey: number;
  ring: string;
  lastMid0: string | null;
  outbound: OutboundRecord[];
  inbound: string[];
  type?: string | null;
  meta?: Record<string, unknown> | null;
}

function checkSnapshot(s: unknown): Snapshot {
  if (!isPlainObject(s)) damage('snapshot is not an object');
  only(s, 'snapshot', ['id', 'nextMid', 'nextKey', 'ring', 'lastMid0', 'outbound', 'inbound', 'type', 'meta']);
  if (s.id !== undefined && (typeof s.id !== 'string' || s.id.length === 0)) damage('snapshot id is not a client ID');
  if (!isMid(s.nextMid)) damage(`snapshot nextMid is not a message id (0-255): ${JSON.stringify(s.nextMid)}`);
  if (!isKey(s.nextKey)) damage('snapshot nextKey is not a positive integer');
  if (typeof s.ring !== 'string' || !RING_HEX.test(s.ring)) damage('snapshot ring is not 32 bytes of hex');
  if (s.lastMid0 !== null && !isPayload(s.lastMid0)) damage('snapshot lastMid0 is neither null nor a line');
  if (!Array.isArray(s.outbound)) damage('snapshot outbound is not a list');
  if (!Array.isArray(s.inbound)) damage('snapshot inbound is not a list');
  s.inbound.forEach((l, i) => isPayload(l) || damage(`snapshot inbound[${i}] is not a line`));
  if (s.type !== undefined && s.type !== null && (typeof s.type !== 'string' || s.type.length === 0)) damage('snapshot type is not a name');
  if (s.meta !== undefined && s.meta !== null && !isPlainObject(s.meta)) damage('snapshot meta is not an object');
  return { ...(s as unknown as Snapshot), outbound: s.outbound.map(checkOutbound) };
}

/** The live mirror of one client's durable state. */
class State {
  id: string | undefined;
  nextMid = 0;
  nextKey = 1;
  readonly filter = new ReceiveFilter();
  readonly outbound = new Map<number, OutboundRecord>();
  readonly inbound: string[] = [];
  type: string | null = null;
  meta: Record<string, unknown> | null = null;

  /** Applies one record from disk, checking its shape and values first (JournalDamage if wrong). */
  replay(rec: unknown): void {
    if (!isPlainObject(rec)) damage(`record is ${rec === null ? 'null' : Array.isArray(rec) ? 'a list' : typeof rec}, not an object`);
    const keys = Object.keys(rec);
    if (keys.length !== 1) damage(`record has ${keys.length} fields, not 1`);
    const [k] = keys;
    const v = rec[k];
    switch (k) {
      case 'S': {
        const s = checkSnapshot(v);
        const mids = new Set<number>();
        const okeys = new Set<number>();
        for (const o of s.outbound) {
          if (okeys.has(o.key)) damage(`snapshot outbound key ${o.key} appears twice`);
          okeys.add(o.key);
          if (o.mid !== undefined) {
            if (mids.has(o.mid)) damage(`snapshot outbound mid ${o.mid} appears twice`);
            mids.add(o.mid);
          }
        }
        this.id = s.id ?? this.id;
        this.nextMid = s.nextMid;
        this.nextKey = s.nextKey;
        this.filter.ring.restore(Buffer.from(s.ring, 'hex'));
        this.filter.lastMid0 = s.lastMid0;
        this.outbound.clear();
        for (const o of s.outbound) this.outbound.set(o.key, o);
        this.inbound.splice(0, this.inbound.length, ...s.inbound);
        this.type = s.type ?? null;
        this.meta = s.meta ?? null;
        return;
      }
      case 'q':
        if (!Array.isArray(v) || v.length !== 3 || !isKey(v[0]) || !isPayload(v[1]) || typeof v[2] !== 'boolean') damage('"q" record is not [key, line, wait]');
        if (this.outbound.has(v[0])) damage(`"q" record reuses key ${v[0]}`);
        break;
      case 'm':
        if (!Array.isArray(v) || v.length !== 2 || !isKey(v[0]) || !isMid(v[1])) damage('"m" record is not [key, message id 0-255]');
        break;
      case 'a':
      case 'd':
        if (!isKey(v)) damage(`"${k}" record is not a key`);
        break;
      case 'n':
      case 'r':
        if (!Array.isArray(v) || v.length !== 2 || !isMid(v[0]) || !isPayload(v[1])) damage(`"${k}" record is not [message id 0-255, line]`);
        break;
      case 'p':
        if (!isMid(v)) damage('"p" record is not a message id (0-255)');
        break;
      case 't':
        if (v !== 1) damage('"t" record is not 1');
        break;
      case 'y':
        if (!Array.isArray(v) || v.length !== 2) damage('"y" record is not [type, metadata]');
        if (v[0] !== null && (typeof v[0] !== 'string' || v[0].length === 0)) damage('"y" record type is not a name');
        if (v[1] !== null && !isPlainObject(v[1])) damage('"y" record metadata is not an object');
        break;
      default:
        damage(`unknown record type "${k}"`);
    }
    this.apply(rec);
  }

  /** Applies one record (trusted: made by this process, or checked by replay()). */
  apply(rec: Record<string, unknown>): void {
    if ('q' in rec) {
      const [key, payload, wait] = rec.q as [number, string, boolean];
      this.outbound.set(key, { key, payload, wait });
      if (key >= this.nextKey) this.nextKey = key + 1;
    } else if ('m' in rec) {
      const [key, mid] = rec.m as [number, number];
      const o = this.outbound.get(key);
      if (o) o.mid = mid;
      this.nextMid = mid >= 255 ? 1 : mid + 1;
    } else if ('a' in rec) {
      this.outbound.delete(rec.a as number);
    } else if ('d' in rec) {
      this.outbound.delete(rec.d as number);
    } else if ('n' in rec) {
      // The ring as the receiver's filter left it for a new message.
      const [mid, payload] = rec.n as [number, string];
      this.filter.ring.isNew(mid);
      if (mid === 0) this.filter.lastMid0 = payload;
      this.inbound.push(payload);
    } else if ('p' in rec) {
      this.filter.ring.mark(rec.p as number);
    } else if ('r' in rec) {
      const [mid, payload] = rec.r as [number, string];
      if (this.filter.accept(mid, payload)) this.inbound.push(payload);
    } else if ('t' in rec) {
      this.inbound.shift();
    } else if ('y' in rec) {
      const [type, meta] = rec.y as [string | null, Record<string, unknown> | null];
      this.type = type;
      this.meta = meta;
    }
  }

  /** Checks what the records add up to (JournalDamage if inconsistent) and repairs what is harmless. */
  settle(): void {
    let maxKey = 0;
    for (const o of this.outbound.values()) {
      if (o.key > maxKey) maxKey = o.key;
      if (o.mid !== undefined && this.nextMid === 0) damage('a message was sent but nextMid is 0 (a restored Connection must never send mid 0)');
    }
    const mids = new Set<number>();
    for (const o of this.outbound.values()) {
      if (o.mid === undefined) continue;
      if (mids.has(o.mid)) damage(`two messages in flight share mid ${o.mid}`);
      mids.add(o.mid);
    }
    if (maxKey >= this.nextKey) this.nextKey = maxKey + 1;
  }

  snapshot(): Record<string, unknown> {
    const s: Record<string, unknown> = {
      id: this.id,
      nextMid: this.nextMid,
      nextKey: this.nextKey,
      ring: Buffer.from(this.filter.ring.snapshot()).toString('hex'),
      lastMid0: this.filter.lastMid0,
      outbound: [...this.outbound.values()],
      inbound: this.inbound,
    };
    if (this.type !== null) s.type = this.type;
    if (this.meta !== null) s.meta = this.meta;
    return { S: s };
  }

  restored(): RestoredState {
    const r: RestoredState = {
      nextMid: this.nextMid,
      nextKey: this.nextKey,
      ring: this.filter.ring.snapshot(),
      lastMid0: this.filter.lastMid0,
      outbound: [...this.outbound.values()].map((o) => ({ ...o })),
      inbound: [...this.inbound],
    };
    if (this.type !== null) r.type = this.type;
    if (this.meta !== null) r.meta = { ...this.meta };
    return r;
  }

  /** True if there is nothing worth restoring (a journal of a device that never exchanged a message). */
  get empty(): boolean {
    return (
      this.nextMid === 0 &&
      this.outbound.size === 0 &&
      this.inbound.length === 0 &&
      this.filter.lastMid0 === null &&
      this.filter.ring.snapshot().every((b) => b === 0) &&
      this.type === null &&
      this.meta === null
    );
  }
}

/**
 * Reads a journal's text back into its state, checking every record. A torn
 * last line (the process died while writing it; no newline after it) is
 * skipped when it does not parse. Anything else wrong throws JournalDamage.
 */
export function parseJournal(text: string): { state: State; torn: boolean; records: number } {
  const state = new State();
  const lines = text.split('\n');
  const tail = lines.pop()!; // '' when the file ends with a newline
  let torn = false;
  lines.forEach((line, i) => {
    let rec: unknown;
    try {
      rec = JSON.parse(line);
    } catch {
      damage(`line ${i + 1} is not JSON`);
    }
    try {
      state.replay(rec);
    } catch (e) {
      if (e instanceof JournalDamage) damage(`line ${i + 1}: ${e.message}`);
      throw e;
    }
  });
  if (tail !== '') {
    torn = true;
    try {
      state.replay(JSON.parse(tail));
    } catch {
      // The process died while writing this line; its effect never reached the peer.
    }
  }
  state.settle();
  return { state, torn, records: lines.length };
}

// ---- the store ---------------------------------------------------------------

/** ms before a degraded journal is tried again; doubles up to RETRY_MAX. */
const RETRY_MIN = 1000;
const RETRY_MAX = 30_000;

function errCode(e: unknown): string {
  return (e as NodeJS.ErrnoException)?.code ?? (e instanceof Error ? e.message : String(e));
}

/** What to do about a failed journal write, by error code. */
function writeHint(code: string): string {
  switch (code) {
    case 'ENOSPC':
    case 'EDQUOT':
      return 'the disk (or quota) holding the journals is full: free space there; persistence resumes by itself once writes succeed';
    case 'EACCES':
    case 'EPERM':
    case 'EROFS':
      return 'the journal folder or file is not writable (permissions, an immutable flag, a read-only mount): fix that; persistence resumes by itself';
    case 'EMFILE':
    case 'ENFILE':
      return 'the process ran out of file descriptors: raise its limit (ulimit -n) or lower persist.maxOpenFiles; persistence resumes by itself';
    case 'ENOENT':
    case 'ENOTDIR':
      return 'the journal folder is gone or replaced: recreate it as a writable folder; persistence resumes by itself';
    default:
      return 'check the disk and the journal folder; persistence resumes by itself once writes succeed';
  }
}

let fdLimit: number | null | undefined;

/** This process's soft limit on open files (Linux: /proc/self/limits), or null if unknown or unlimited. */
function openFileLimit(): number | null {
  if (fdLimit !== undefined) return fdLimit;
  fdLimit = null;
  try {
    const m = /^Max open files\s+(\d+)/m.exec(fs.readFileSync('/proc/self/limits', 'utf8'));
    if (m) fdLimit = Number(m[1]);
  } catch {
    // not Linux: the cap is maxOpenFiles, and running out of descriptors is handled when it happens
  }
  return fdLimit;
}

export class FileStore {
  readonly dir: string;
  private readonly fsync: boolean;
  private readonly compactEvery: number;
  private readonly compactBytes: number;
  private readonly maxOpenFiles: number;
  /** The cap in force: maxOpenFiles, lowered when the process ran out of descriptors. */
  private openCap: number;
  private readonly log?: Logger;
  /** Every journal this store holds, by client ID. */
  private readonly journals = new Map<string, FileJournal>();
  /** Journals with an open file, least recently used first. */
  private readonly lru = new Map<FileJournal, true>();
  private lastUsed: FileJournal | null = null;
  private readonly failing = new Set<FileJournal>();
  private retryTimer: NodeJS.Timeout | null = null;
  private readonly counts = { quarantined: 0, writeFailures: 0, recovered: 0, compactions: 0 };

  constructor(opts: StoreOptions) {
    const o = checkStoreOptions(opts);
    this.dir = path.resolve(o.dir);
    this.fsync = o.fsync;
    this.compactEvery = o.compactEvery;
    this.compactBytes = o.compactBytes;
    this.log = opts.logger;
    let cap = o.maxOpenFiles;
    const limit = openFileLimit();
    if (opts.maxOpenFiles === undefined && limit !== null && cap > Math.floor(limit / 4)) {
      // The default leaves three quarters of the descriptors to sockets, or new device links would be refused.
      cap = Math.max(1, Math.floor(limit / 4));
      this.log?.info('persist: fewer journal files kept open than the default, to leave descriptors for sockets', {
        maxOpenFiles: cap,
        openFileLimit: limit,
        hint: 'raise the process limit (ulimit -n) to keep more open, or set persist.maxOpenFiles',
      });
    }
    this.maxOpenFiles = this.openCap = cap;
    try {
      fs.mkdirSync(this.dir, { recursive: true });
      if (!fs.statSync(this.dir).isDirectory()) throw Object.assign(new Error('not a folder'), { code: 'ENOTDIR' });
      fs.accessSync(this.dir, fs.constants.W_OK);
    } catch (e) {
      throw new TetherError('ERR_BAD_CONFIG', `persist: cannot use ${this.dir} (${errCode(e)}): choose a writable folder`);
    }
  }

  /** The journal file of `id` (see journalName). */
  fileOf(id: string): string {
    return path.join(this.dir, journalName(id));
  }

  /** Client IDs this store holds a journal for. */
  ids(): string[] {
    return [...this.journals.keys()];
  }

  /** Counts for metrics: journals, open files, degraded, quarantined, failures, recoveries, compactions. */
  stats(): StoreStats {
    return {
      journals: this.journals.size,
      openFiles: this.lru.size,
      maxOpenFiles: this.openCap,
      degraded: this.failing.size,
      ...this.counts,
    };
  }

  /** True while `id`'s journal is degraded: its device works, but nothing of it reaches the disk. */
  isDegraded(id: string): boolean {
    return this.journals.get(id)?.degraded ?? false;
  }

  /** Client IDs whose journal is degraded right now. */
  degradedIds(): string[] {
    return [...this.failing].map((j) => j.id);
  }

  /**
   * Loads every journal in the folder (damaged ones are quarantined, old file
   * names migrated), for the Server to recreate their Connections at start.
   * `accept` may skip IDs (their files stay untouched); at most `max` are loaded.
   */
  restoreAll(accept: (id: string) => boolean = () => true, max = Infinity): Array<{ id: string; restored: RestoredState; journal: Journal }> {
    let names: string[];
    try {
      names = fs.readdirSync(this.dir).filter((n) => n.endsWith(EXT)).sort();
    } catch (e) {
      this.loud('error', 'journal folder cannot be listed: no device state restored', { dir: this.dir, code: errCode(e), hint: writeHint(errCode(e)) });
      return [];
    }
    const out: Array<{ id: string; restored: RestoredState; journal: Journal }> = [];
    const quarantinedBefore = this.counts.quarantined;
    let skipped = 0;
    for (const name of names) {
      let file = path.join(this.dir, name);
      const nameId = idFromName(name);
      const loaded = this.load(file, nameId);
      if (loaded.kind !== 'ok') continue;
      const { state } = loaded;
      const id = state.id ?? nameId;
      if (id === undefined || id === null) {
        this.quarantine(file, null, 'it does not say which client ID it belongs to');
        continue;
      }
      if (nameId !== null && state.id !== undefined && nameId !== state.id) {
        this.quarantine(file, id, `its name is for ${JSON.stringify(nameId)} but it holds ${JSON.stringify(state.id)}`);
        continue;
      }
      if (this.journals.has(id)) {
        this.quarantine(file, id, 'another journal of the same client ID was loaded first');
        continue;
      }
      if (!accept(id) || out.length >= max) {
        skipped++;
        continue;
      }
      const canonical = this.fileOf(id);
      if (canonical !== file) {
        // A name from an earlier version (too long or not plain): move it to its name now.
        if (fs.existsSync(canonical)) {
          this.quarantine(file, id, `its ID's journal is now ${path.basename(canonical)}, which exists too`);
          continue;
        }
        try {
          fs.renameSync(file, canonical);
          this.log?.info('journal renamed to its new file name', { client: id, from: name, to: path.basename(canonical) });
          file = canonical;
        } catch (e) {
          this.loud('warn', 'journal could not be renamed to its new file name: kept under the old one for now', { client: id, file, code: errCode(e) });
        }
      }
      state.id = id;
      const journal = new FileJournal(this, id, file, state);
      this.journals.set(id, journal);
      out.push({ id, restored: state.restored(), journal });
    }
    if (skipped > 0) {
      this.log?.info('journals left on disk without a Connection (ID not allowed, or maxDevices reached)', { count: skipped, dir: this.dir });
    }
    const quarantined = this.counts.quarantined - quarantinedBefore;
    if (out.length > 0 || quarantined > 0) {
      const fields = {
        devices: out.length,
        outbound: out.reduce((n, r) => n + r.restored.outbound.length, 0),
        inbound: out.reduce((n, r) => n + r.restored.inbound.length, 0),
        quarantined,
      };
      if (quarantined > 0) this.log?.warn('journals restored', { ...fields, hint: 'damaged journals were moved aside (see the records before this one); their devices start afresh' });
      else this.log?.info('journals restored', fields);
    }
    return out;
  }

  /**
   * The journal of `id` (one per ID), with what it held (null if nothing, or
   * if it was damaged and quarantined). I/O problems never throw: the journal
   * then starts degraded and the Connection works in memory.
   */
  attach(id: string): { restored: RestoredState | null; journal: Journal } {
    if (this.journals.has(id)) throw new Error(`the journal of ${JSON.stringify(id)} is already attached`);
    let file = this.fileOf(id);
    let from = file;
    let loaded = this.load(file, id);
    if (loaded.kind === 'fresh') {
      // A journal under the name an earlier version gave this ID, if that name is different.
      let legacy: string | null = null;
      try {
        legacy = path.join(this.dir, encodeURIComponent(id) + EXT);
      } catch {
        // not encodable: earlier versions could not have written it either
      }
      if (legacy && legacy !== file && Buffer.byteLength(path.basename(legacy)) <= 255 && fs.existsSync(legacy)) {
        from = legacy;
        loaded = this.load(legacy, id);
      }
    }
    const state = loaded.kind === 'ok' ? loaded.state : new State();
    if (state.id !== undefined && state.id !== id) {
      this.quarantine(from, id, `it holds the journal of ${JSON.stringify(state.id)}`);
      return this.attachFresh(id, file);
    }
    if (from !== file && loaded.kind === 'ok') {
      try {
        fs.renameSync(from, file);
      } catch (e) {
        this.loud('warn', 'journal could not be renamed to its new file name: kept under the old one for now', { client: id, file: from, code: errCode(e) });
        file = from;
      }
    }
    state.id = id;
    const journal = new FileJournal(this, id, file, state);
    this.journals.set(id, journal);
    if (loaded.kind === 'blocked') {
      // Its file could not be read nor moved aside: never overwrite it in this run.
      journal.block(loaded.code);
      return { restored: null, journal };
    }
    if (loaded.kind === 'ok' && !state.empty) {
      const r = state.restored();
      this.log?.info('journal restored', { client: id, outbound: r.outbound.length, inbound: r.inbound.length, nextMid: r.nextMid });
      return { restored: r, journal };
    }
    return { restored: null, journal };
  }

  private attachFresh(id: string, file: string): { restored: null; journal: Journal } {
    const state = new State();
    state.id = id;
    const journal = new FileJournal(this, id, file, state);
    this.journals.set(id, journal);
    return { restored: null, journal };
  }

  /**
   * A new link of `id` begins (call it before the Connection takes the link):
   * records the type and metadata it declared (restored with its Connection
   * after a restart) and lets the journal's duplicate filter follow the link
   * and the boot id, as the Connection's does.
   */
  linked(id: string, type: string | undefined, meta: Record<string, unknown> | undefined, boot?: string): void {
    this.journals.get(id)?.linked(type ?? null, meta && Object.keys(meta).length > 0 ? meta : null, boot);
  }

  /** Deletes the journal of `id` (a Connection retired by its app starts afresh). Never throws. */
  forget(id: string): void {
    const j = this.journals.get(id);
    j?.close();
    this.journals.delete(id);
    const file = j?.file ?? this.fileOf(id);
    try {
      fs.rmSync(file, { force: true });
    } catch (e) {
      this.counts.writeFailures++;
      this.loud('error', 'journal of a retired Connection could not be deleted: its state comes back after a restart', {
        client: id,
        file,
        code: errCode(e),
        hint: `delete ${file} while the server is stopped`,
      });
    }
  }

  /** Closes every journal file. Never throws. */
  closeAll(): void {
    for (const j of [...this.journals.values()]) j.close();
    if (this.retryTimer) clearInterval(this.retryTimer);
    this.retryTimer = null;
  }

  // ---- for FileJournal -------------------------------------------------------

  /** @internal What every journal of this store writes by. */
  get options(): { readonly fsync: boolean; readonly compactEvery: number; readonly compactBytes: number } {
    return (this.writeOpts ??= Object.freeze({ fsync: this.fsync, compactEvery: this.compactEvery, compactBytes: this.compactBytes }));
  }
  private writeOpts?: { readonly fsync: boolean; readonly compactEvery: number; readonly compactBytes: number };

  /** @internal Opens a file for a journal, closing idle journals' files to stay under the cap (and on EMFILE). */
  openFor(j: FileJournal | null, file: string, flags: string): number {
    if (j) {
      while (this.lru.size >= this.openCap) this.evictOldest(j);
    }
    try {
      return fs.openSync(file, flags);
    } catch (e) {
      const code = errCode(e);
      if ((code !== 'EMFILE' && code !== 'ENFILE') || this.lru.size === 0) throw e;
      // Out of descriptors: give back half of ours, lower the cap, and try once more.
      const before = this.openCap;
      this.openCap = Math.max(1, Math.floor(this.lru.size / 2));
      while (this.lru.size > this.openCap - (j ? 1 : 0) && this.lru.size > 0) this.evictOldest(j);
      this.loud('warn', 'out of file descriptors: fewer journal files are kept open from now on', {
        code,
        maxOpenFiles: before,
        now: this.openCap,
        hint: 'raise the process limit (ulimit -n) or lower persist.maxOpenFiles',
      });
      return fs.openSync(file, flags);
    }
  }

  /** @internal */
  opened(j: FileJournal): void {
    this.lru.set(j, true);
    this.lastUsed = j;
  }

  /** @internal Marks `j` most recently used. */
  touch(j: FileJournal): void {
    if (this.lastUsed === j) return;
    this.lru.delete(j);
    this.lru.set(j, true);
    this.lastUsed = j;
  }

  /** @internal */
  released(j: FileJournal): void {
    this.lru.delete(j);
    if (this.lastUsed === j) this.lastUsed = null;
  }

  private evictOldest(keep: FileJournal | null): void {
    for (const j of this.lru.keys()) {
      if (j === keep) continue;
      j.closeFile();
      return;
    }
    // Only `keep` itself is open.
    keep?.closeFile();
  }

  /** @internal Reads a whole file, with the same descriptor relief as openFor(). */
  read(file: string): string {
    const fd = this.openFor(null, file, 'r');
    try {
      return fs.readFileSync(fd, 'utf8');
    } finally {
      fs.closeSync(fd);
    }
  }

  /** @internal A journal's write failed: count it, log it (throttled), retry it later. */
  failed(j: FileJournal, op: string, e: unknown, first: boolean): void {
    this.counts.writeFailures++;
    if (!first) return;
    const code = errCode(e);
    this.failing.add(j);
    this.loud('error', 'journal write failed: this device now runs in memory only, without persistence', {
      client: j.id,
      file: j.file,
      op,
      code,
      hint: writeHint(code),
    });
    if (!this.retryTimer) {
      this.retryTimer = setInterval(() => this.retryFailing(), RETRY_MIN);
      this.retryTimer.unref();
    }
  }

  /** @internal */
  recovered(j: FileJournal): void {
    this.failing.delete(j);
    this.counts.recovered++;
    this.loud('warn', 'journal writable again: persistence resumed for this device', { client: j.id, file: j.file });
    if (this.failing.size === 0 && this.retryTimer) {
      clearInterval(this.retryTimer);
      this.retryTimer = null;
    }
  }

  /** @internal */
  gone(j: FileJournal): void {
    this.failing.delete(j);
    this.released(j);
    if (this.failing.size === 0 && this.retryTimer) {
      clearInterval(this.retryTimer);
      this.retryTimer = null;
    }
  }

  /** @internal */
  compacted(): void {
    this.counts.compactions++;
  }

  private retryFailing(): void {
    const now = Date.now();
    for (const j of [...this.failing]) j.retry(now);
  }

  /** Reads a journal file: its state, or why not (`fresh` also after quarantining it). */
  private load(file: string, id: string | null): { kind: 'ok'; state: State } | { kind: 'fresh' } | { kind: 'blocked'; code: string } {
    let text: string;
    try {
      text = this.read(file);
    } catch (e) {
      const code = errCode(e);
      if (code === 'ENOENT') return { kind: 'fresh' };
      if (code === 'EMFILE' || code === 'ENFILE' || code === 'EIO') {
        this.counts.writeFailures++;
        this.loud('error', 'journal could not be read: left untouched, this device runs in memory only until the next start', {
          client: id ?? undefined,
          file,
          code,
          hint: writeHint(code),
        });
        return { kind: 'blocked', code };
      }
      return this.quarantine(file, id, `it cannot be read (${code})`) ? { kind: 'fresh' } : { kind: 'blocked', code };
    }
    try {
      const { state, torn } = parseJournal(text);
      if (torn) this.log?.warn('journal: ignored a torn last record', { client: id ?? state.id, file });
      return { kind: 'ok', state };
    } catch (e) {
      const why = e instanceof JournalDamage ? e.message : `it could not be replayed (${(e as Error)?.message ?? e})`;
      return this.quarantine(file, id, why) ? { kind: 'fresh' } : { kind: 'blocked', code: 'EDAMAGED' };
    }
  }

  /** Renames a bad journal aside (kept for a person to look at); true if it is out of the way. */
  private quarantine(file: string, id: string | null, why: string): boolean {
    const stamp = new Date().toISOString().replace(/[-:.]/g, '');
    let to = `${file}.damaged-${stamp}`;
    for (let n = 2; fs.existsSync(to); n++) to = `${file}.damaged-${stamp}-${n}`;
    try {
      fs.renameSync(file, to);
    } catch (e) {
      this.counts.writeFailures++;
      this.loud('error', 'damaged journal could not be moved aside: left untouched, this device runs in memory only until the next start', {
        client: id ?? undefined,
        file,
        damage: why,
        code: errCode(e),
        hint: `move ${file} away by hand (and check the folder's permissions), then restart`,
      });
      return false;
    }
    this.counts.quarantined++;
    this.loud('error', 'damaged journal moved aside: this device starts afresh', {
      client: id ?? undefined,
      file,
      movedTo: path.basename(to),
      damage: why,
      hint: 'what the journal held (queued or unread lines) is not restored; the file is kept for inspection, delete it when done',
    });
    return true;
  }

  /** Logs throttled (limits.ts: at most 10 records per message every 10 s; the next one says how many were left out). */
  private loud(level: 'warn' | 'error', msg: string, fields: Fields): void {
    if (!this.log) return;
    if (level === 'error') throttledError(this.log, msg, fields);
    else throttledWarn(this.log, msg, fields);
  }
}

class FileJournal implements Journal {
  private fd = -1;
  /** A snapshot was written in this run (every run starts its file from one). */
  private started = false;
  private records = 0;
  private bytes = 0;
  private snapBytes = 0;
  private closed = false;
  /** Why nothing reaches the disk right now, or null. */
  private failure: string | null = null;
  /** The file could not be read at start: never written in this run. */
  private blocked = false;
  private retryAt = 0;
  private backoff = RETRY_MIN;

  constructor(
    private readonly store: FileStore,
    readonly id: string,
    readonly file: string,
    private readonly state: State,
  ) {}

  get degraded(): boolean {
    return this.failure !== null;
  }

  /** @internal Never writes to the file (it could not be read, so it must not be overwritten). */
  block(code: string): void {
    this.blocked = true;
    this.failure = code;
    this.store.failed(this, 'read', Object.assign(new Error(code), { code }), true);
  }

  /** Applies `rec` to the state (unless `applied` already) and writes it, or degrades on failure. */
  private append(rec: Record<string, unknown>, applied = false): void {
    if (!applied) this.state.apply(rec);
    if (this.closed || this.blocked) return;
    if (this.failure !== null) {
      if (Date.now() >= this.retryAt) this.retry(Date.now());
      return; // a successful retry wrote a snapshot that includes this record
    }
    if (!this.started) {
      this.snapshot('snapshot'); // includes this record
      return;
    }
    const opts = this.store.options;
    try {
      if (this.fd < 0) {
        this.fd = this.store.openFor(this, this.file, 'a');
        this.store.opened(this);
      } else {
        this.store.touch(this);
      }
      const buf = Buffer.from(JSON.stringify(rec) + '\n');
      for (let off = 0; off < buf.length; ) off += fs.writeSync(this.fd, buf, off);
      if (opts.fsync) fs.fsyncSync(this.fd);
      this.bytes += buf.length;
    } catch (e) {
      this.fail('append', e);
      return;
    }
    if (++this.records >= opts.compactEvery || this.bytes >= Math.max(opts.compactBytes, this.snapBytes)) this.snapshot('compact');
  }

  /** Writes the whole state as one snapshot, atomically (temp file, rename), and reopens for appending. */
  private snapshot(op: string): boolean {
    try {
      this.rewrite();
      return true;
    } catch (e) {
      this.fail(op, e);
      return false;
    }
  }

  private rewrite(): void {
    const { fsync } = this.store.options;
    this.closeFile();
    const tmp = this.file + '.tmp';
    const data = Buffer.from(JSON.stringify(this.state.snapshot()) + '\n');
    try {
      const fd = this.store.openFor(null, tmp, 'w');
      try {
        for (let off = 0; off < data.length; ) off += fs.writeSync(fd, data, off);
        if (fsync) fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(tmp, this.file);
    } catch (e) {
      try {
        fs.rmSync(tmp, { force: true });
      } catch {
        // left for the next snapshot to overwrite
      }
      throw e;
    }
    if (fsync) {
      try {
        const dfd = fs.openSync(path.dirname(this.file), 'r');
        try {
          fs.fsyncSync(dfd);
        } finally {
          fs.closeSync(dfd);
        }
      } catch {
        // not every file system syncs folders; the rename is on its way to the disk anyway
      }
    }
    this.started = true;
    this.records = 0;
    this.bytes = 0;
    this.snapBytes = data.length;
    this.store.compacted();
    this.fd = this.store.openFor(this, this.file, 'a');
    this.store.opened(this);
  }

  private fail(op: string, e: unknown): void {
    this.closeFile();
    const first = this.failure === null;
    this.failure = errCode(e);
    this.retryAt = Date.now() + this.backoff;
    this.backoff = Math.min(this.backoff * 2, RETRY_MAX);
    this.store.failed(this, op, e, first);
  }

  /** @internal Tries to get a degraded journal back: one snapshot of the whole state replaces whatever the file holds. */
  retry(now: number): void {
    if (this.closed || this.blocked || this.failure === null || now < this.retryAt) return;
    try {
      this.rewrite();
    } catch (e) {
      this.fail('retry', e);
      return;
    }
    this.failure = null;
    this.backoff = RETRY_MIN;
    this.store.recovered(this);
  }

  /** @internal Closes the file (an idle journal; it is reopened on its next record). */
  closeFile(): void {
    if (this.fd < 0) return;
    const fd = this.fd;
    this.fd = -1;
    this.store.released(this);
    try {
      fs.closeSync(fd);
    } catch {
      // nothing was pending on it: every write is synchronous
    }
  }

  linked(type: string | null, meta: Record<string, unknown> | null, boot: string | undefined): void {
    this.state.filter.newLink(boot);
    if (type === this.state.type && JSON.stringify(meta) === JSON.stringify(this.state.meta)) return;
    this.append({ y: [type, meta] });
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

  received(mid: number, payload: string, fresh?: boolean): void {
    // The verdict goes into the record, so a replay never has to decide again (a repeat costs a few bytes).
    const own = this.state.filter.accept(mid, payload);
    if (fresh ?? own) {
      this.state.inbound.push(payload);
      this.append({ n: [mid, payload] }, true);
    } else {
      this.append({ p: mid }, true);
    }
  }

  taken(): void {
    this.append({ t: 1 });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.closeFile();
    this.store.gone(this);
  }
}
