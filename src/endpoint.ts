/**
 * The protocol state machine shared by both ends of a link (PROTOCOL.md section 1):
 * keepalives, outage detection, message ids, ACKs, the duplicate ring, qos
 * retransmission and backpressure. It owns at most one link at a time and
 * outlives every link: what it holds (id counter, ring, unacknowledged messages,
 * received lines) carries over from one link to the next.
 *
 * The server's Connection and the Node Client are thin subclasses that decide when
 * a link comes and when it counts as up.
 */
import { throttledWarn } from './limits';
import { EventEmitter } from 'node:events';
import { nanoid } from 'nanoid';
import { abortedError, closedError, lineTooLongForLink, payloadError, TetherError, waitAbortedError } from './errors';
import type { Link } from './link';
import type { Logger } from './log';
import { silentLogger } from './log';
import {
  formatAck,
  formatMessage,
  KEEPALIVE,
  LineSplitter,
  MidGenerator,
  normalizePayload,
  parseLine,
  parseMid,
  payloadProblem,
  ReceiveFilter,
} from './protocol';
import type { Journal, RestoredState } from './store';
import { deferred, Notifier, preview, raceAbort, shown } from './util';

export interface EndpointOptions {
  /** Outage after this many ms without a byte from the peer; keepalives every timeout/4. Both ends must agree. Default 2000. */
  timeout?: number;
  /** Longest line accepted or sent, in bytes without the `\n` (id included). Longer received lines are dropped and counted. Default 65536. */
  maxLineLength?: number;
  /** Received lines ACKed and kept for the app to read. When full, further messages wait un-ACKed (rxHold). Default 64. */
  rxBuffer?: number;
  /**
   * Messages held un-ACKed while rxBuffer is full, ACKed in arrival order as the
   * app reads. It must cover the peer's in-flight window, so that a pipelining
   * peer is paced by withheld ACKs instead of refusals. Beyond it, reading the
   * link pauses while no write of ours awaits an ACK; otherwise further messages
   * are refused without ACK (qos senders resend them). Default 32.
   */
  rxHold?: number;
  /**
   * Size of the received lines kept for the app, and separately of those held,
   * counted in characters of text (bytes for ASCII). At least one line is always
   * taken. Default 262144 (256 KiB).
   */
  rxBufferBytes?: number;
  /** ms the receive buffer may stay full with no line read before the link is reported stalled ("nobody is reading"). Default: timeout. */
  stallAfter?: number;
  /** A budget shared by many endpoints (the Server's maxBufferedBytes): buffered lines count against it too. Default: none. */
  budget?: RxBudget;
  /** Writes queued behind the one being sent; a further write() waits for room. Default 64. */
  maxQueuedWrites?: number;
  /** Unacknowledged qos messages in flight for writes with `wait: false`. Kept far below the ring's ~120. Default 8. */
  window?: number;
  logger?: Logger;
}

/** Characters of received lines buffered by many endpoints together, and the most they may hold. */
export class RxBudget {
  used = 0;
  /** Reported full (logged once until it has room again). */
  full = false;
  constructor(readonly max: number) {}
}

export const ENDPOINT_DEFAULTS = {
  timeout: 2000,
  maxLineLength: 65536,
  rxBuffer: 64,
  rxHold: 32,
  rxBufferBytes: 256 * 1024,
  maxQueuedWrites: 64,
  window: 8,
} as const;

/** Stands for the payload of a message line over maxLineLength (a real payload never holds `\n`). */
const OVERSIZE = '\n';

/** A message id must not be reused while an older one may still be in the peer's ring. */
const MAX_MID_SPAN = 100;

export interface WriteOptions {
  /** Retransmit until acknowledged, so the line is delivered exactly once. Default true. */
  qos?: boolean;
  /** With qos: first wait until every earlier qos message is acknowledged (keeps order). Default true. */
  wait?: boolean;
  /** Abandons the write; it then rejects with ERR_ABORTED. */
  signal?: AbortSignal;
  /**
   * With qos: resolve as soon as the line is queued (written to the journal
   * when persistence is on) instead of when the peer ACKs it; delivery goes on
   * in the background, across outages and, with persistence, restarts, until
   * the peer ACKs it or the endpoint is closed. `signal` then only bounds the
   * wait for room in the write queue: once accepted, a line is never abandoned.
   */
  accepted?: boolean;
  /** With `accepted`: called once when the background delivery ends (null: the peer ACKed it; else why not, e.g. ERR_CLOSED). */
  onSettled?: (error: Error | null) => void;
}

/** Takes a received line (with `\n`) and its message id; resolves when it is safe to ACK, or null to refuse it. */
export type Consumer = (line: string, mid: number) => Promise<void> | null;

export interface Counters {
  /** Times the link came up. */
  connects: number;
  /** Times an up link was lost (timeout, closed by the peer, replaced…). */
  outages: number;
  messagesIn: number;
  messagesOut: number;
  acksIn: number;
  acksOut: number;
  keepalivesIn: number;
  keepalivesOut: number;
  /** qos messages sent again after a timeout or an outage. */
  retransmits: number;
  /** Received messages the ring recognised as repeats: ACKed, not delivered. */
  duplicatesDropped: number;
  bytesIn: number;
  bytesOut: number;
  /** Lines that were neither keepalive, ACK nor message (non-hex id, bad UTF-8…). */
  badLines: number;
  /** Lines longer than maxLineLength: skipped (a message among them is ACKed and reported as `oversize`). */
  longLines: number;
  /** Messages refused without ACK because the receive buffer and the hold were full while our own writes awaited ACKs (qos senders resend them). */
  shed: number;
  /** Times the link was reported stalled: receive buffer full and nothing read for stallAfter ms. */
  stalls: number;
}

function zeroCounters(): Counters {
  return {
    connects: 0,
    outages: 0,
    messagesIn: 0,
    messagesOut: 0,
    acksIn: 0,
    acksOut: 0,
    keepalivesIn: 0,
    keepalivesOut: 0,
    retransmits: 0,
    duplicatesDropped: 0,
    bytesIn: 0,
    bytesOut: 0,
    badLines: 0,
    longLines: 0,
    shed: 0,
    stalls: 0,
  };
}

interface Pending {
  mid: number;
  wire: string;
  /** Position in this endpoint's stream of messages, to bound id reuse. */
  seq: number;
  /** Journal key, when persistence is on. */
  key?: number;
  /** When it was first sent (never updated). */
  firstSent: number;
  /** When it was last sent (updated by every resend). */
  sentAt: number;
  /** Settles when the peer ACKs it (or the endpoint closes). */
  acked: Promise<void>;
  resolve(): void;
  reject(e: unknown): void;
}

/** A write waiting for its turn: FIFO, sent by pump() as soon as the protocol allows. */
interface Waiting {
  payload: string;
  qos: boolean;
  wait: boolean;
  key?: number;
  resolve(sent: Pending | null): void;
  reject(e: unknown): void;
  /** Removes it from the queue when its signal aborts. */
  unlink?: () => void;
}

interface Reader {
  resolve(line: string): void;
  reject(e: unknown): void;
  /** readline() (the line counts as consumed at once) or take() (only at commit()). */
  auto: boolean;
}

/** An option's value, or a TetherError saying what range it must be in. */
export function checkInt(name: string, v: number, min: number, max = Number.MAX_SAFE_INTEGER): number {
  if (!Number.isInteger(v) || v < min || v > max) {
    throw new TetherError('ERR_BAD_CONFIG', `option ${name} must be an integer from ${min} to ${max}, got ${shown(v)}`);
  }
  return v;
}

export type EndpointState = 'up' | 'down' | 'closed';

export abstract class Endpoint extends EventEmitter {
  readonly counters: Counters = zeroCounters();
  protected readonly log: Logger;
  protected readonly timeout: number;
  protected readonly maxLineLength: number;
  private readonly rxBuffer: number;
  private readonly rxHold: number;
  private readonly rxBufferBytes: number;
  private readonly stallAfter: number;
  private budget: RxBudget | undefined;
  private readonly maxQueuedWrites: number;
  private readonly window: number;

  private link: Link | null = null;
  /** The line limit of the last link, if it announced one below maxLineLength (kept while the link is down). */
  private linkLimit: { max: number; remote: string } | null = null;
  private up = false;
  private settled = false;
  private gotData = false;
  private congested = false;
  /**
   * Reading the link is paused because the buffer and the hold are full and no
   * write of ours awaits an ACK; `parked` is the message line that did not fit
   * and `backlog` the bytes after it, parsed when reading resumes.
   */
  private blocked = false;
  private parked: Buffer | null = null;
  private backlog: Buffer[] = [];
  private unblocking = false;
  /** Received messages not yet ACKed because the buffer is full, oldest first (at most rxHold). */
  private readonly held: Array<{ mid: number; payload: string; bytes: number }> = [];
  private heldBytes = 0;
  private rxBytes = 0;
  /** When the app last took a line, and since when the buffer has been full (0: not full). */
  private lastTaken = 0;
  private fullSince = 0;
  private stalledNow = false;
  /** Boot id the peer announced for the current link (tether's clients; see ReceiveFilter). */
  protected peerBoot: string | undefined;
  /** Takes new messages instead of readline(), see setConsumer(). */
  private consumer: Consumer | null = null;
  /** Messages handed to the consumer, in arrival order; each is ACKed once it and all before it are confirmed. */
  private handing: Array<{ mid: number; payload: string; done: boolean; failed: boolean; stale: boolean }> = [];
  /** Messages whose hand-over failed or was refused, by mid: the peer's resend is new to the consumer. */
  private readonly toRetry = new Map<number, string>();
  /** A bad line was already reported (as a `violation`) for the current link. */
  private linkViolated = false;
  private lastRx = 0;
  private tick: NodeJS.Timeout | null = null;
  private settleTimer: NodeJS.Timeout | null = null;
  private splitter: LineSplitter;
  private closed = false;

  private mids: MidGenerator = new MidGenerator();
  private readonly filter = new ReceiveFilter();
  private seq = 0;
  /** Unacknowledged qos messages by mid, in send order. */
  private readonly pending = new Map<number, Pending>();
  private readonly rx: string[] = [];
  private readonly readers: Reader[] = [];
  private readonly changed = new Notifier();
  /** Writes waiting for their turn, oldest first (at most maxQueuedWrites). */
  private readonly waiting: Waiting[] = [];
  private readonly room = new Notifier();
  /** Durable record of this endpoint's state (server side, with persistence on). */
  protected journal: Journal | null = null;
  private nextKey = 1;

  constructor(opts: EndpointOptions) {
    super();
    this.timeout = checkInt('timeout', opts.timeout ?? ENDPOINT_DEFAULTS.timeout, 4);
    this.maxLineLength = checkInt('maxLineLength', opts.maxLineLength ?? ENDPOINT_DEFAULTS.maxLineLength, 3);
    this.rxBuffer = checkInt('rxBuffer', opts.rxBuffer ?? ENDPOINT_DEFAULTS.rxBuffer, 1);
    this.rxHold = checkInt('rxHold', opts.rxHold ?? ENDPOINT_DEFAULTS.rxHold, 1, 255);
    this.rxBufferBytes = checkInt('rxBufferBytes', opts.rxBufferBytes ?? ENDPOINT_DEFAULTS.rxBufferBytes, 1);
    this.stallAfter = checkInt('stallAfter', opts.stallAfter ?? this.timeout, 1);
    this.budget = opts.budget;
    this.maxQueuedWrites = checkInt('maxQueuedWrites', opts.maxQueuedWrites ?? ENDPOINT_DEFAULTS.maxQueuedWrites, 1);
    this.window = checkInt('window', opts.window ?? ENDPOINT_DEFAULTS.window, 1, MAX_MID_SPAN);
    this.log = opts.logger ?? silentLogger;
    this.splitter = new LineSplitter(this.maxLineLength);
  }

  // ---- public API -------------------------------------------------------

  /** Short random id of the current (or last) link, in its `link up`/`link down` log records. */
  linkId = '';

  /** When a byte last arrived from the peer (ms since the epoch), or 0 if never. */
  lastSeen = 0;

  /** True while a link is up (the original's `status()`). */
  status(): boolean {
    return this.up;
  }

  get isUp(): boolean {
    return this.up;
  }

  get state(): EndpointState {
    return this.closed ? 'closed' : this.up ? 'up' : 'down';
  }

  /** Where the current link comes from, if any. */
  get remote(): string | undefined {
    return this.link?.remote;
  }

  /** Unacknowledged qos messages right now. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Writes accepted by write() and not yet sent (queued, or waiting for room in the window). */
  get queuedWrites(): number {
    return this.waiting.length;
  }

  /** Received lines (ACKed) waiting to be read. */
  get buffered(): number {
    return this.rx.length;
  }

  /** Bytes of the received lines waiting to be read. */
  get bufferedBytes(): number {
    return this.rxBytes;
  }

  /** Received messages held un-ACKed until the app reads (the buffer is full). */
  get heldMessages(): number {
    return this.held.length;
  }

  /** True while reading the link is paused (buffer and hold full, nothing of ours awaiting an ACK): its silence proves nothing. */
  get readingPaused(): boolean {
    return this.blocked;
  }

  /** True while the receive buffer has been full with nothing read for stallAfter ms: nobody is reading. */
  get stalled(): boolean {
    return this.stalledNow;
  }

  /** Resolves when the link is up (at once if it is). */
  async ready(signal?: AbortSignal): Promise<void> {
    while (!this.up) {
      if (this.closed) throw closedError(this.describe());
      await this.changed.wait(signal, waitAbortedError('ready()'));
    }
  }

  /**
   * Sends one line. With qos (default) it resolves once the peer has ACKed it,
   * retransmitting after every `timeout` without ACK and after every outage; an
   * outage is waited out, never an error. Rejects at once for an empty line or one
   * with `\n` inside (a single trailing `\n` is stripped).
   */
  write(line: string, opts: WriteOptions = {}): Promise<void> {
    const signal = opts.signal;
    if (this.closed) return Promise.reject(closedError(this.describe()));
    if (typeof line !== 'string') {
      return Promise.reject(new TypeError(`write() takes a string, got ${typeof line}: convert it first (e.g. JSON.stringify)`));
    }
    const payload = normalizePayload(line);
    const problem = payloadProblem(payload, this.maxLineLength);
    if (problem) return Promise.reject(payloadError(problem, this.maxLineLength));
    // A link that carries less than maxLineLength (a mesh node: one frame) says so; its limit stays while it is down.
    if (this.linkLimit && payloadProblem(payload, this.linkLimit.max) === 'too-long') {
      return Promise.reject(lineTooLongForLink(Buffer.byteLength(payload) + 2, this.linkLimit.max, this.linkLimit.remote));
    }
    if (signal?.aborted) return Promise.reject(abortedError(signal.reason));
    // Not async on the common path: one promise per write, not a chain of them.
    if (this.waiting.length < this.maxQueuedWrites) return this.accept(payload, opts);
    return this.writeWhenRoom(payload, opts);
  }

  /** Bounded queue: a writer that outruns the peer waits here, it does not pile up. */
  private async writeWhenRoom(payload: string, opts: WriteOptions): Promise<void> {
    while (this.waiting.length >= this.maxQueuedWrites) {
      await this.room.wait(opts.signal, abortedError);
      if (this.closed) throw closedError(this.describe());
    }
    return this.accept(payload, opts);
  }

  private accept(payload: string, opts: WriteOptions): Promise<void> {
    const qos = opts.qos ?? true;
    const wait = opts.wait ?? true;
    const signal = opts.signal;
    let key: number | undefined;
    if (qos && this.journal) {
      key = this.nextKey++;
      this.journal.queued(key, payload, wait);
    }
    // An accepted line is delivered whatever happens to the caller's signal afterwards.
    const delivery = this.deliver(payload, qos, wait, qos && opts.accepted ? undefined : signal, key);
    if (qos && opts.accepted) {
      const settled = opts.onSettled;
      delivery.then(
        () => settled?.(null),
        (e: unknown) => {
          if (!(e instanceof TetherError && e.code === 'ERR_CLOSED')) throttledWarn(this.log, 'accepted write not delivered', { error: (e as Error).message });
          settled?.(e as Error);
        },
      );
      return Promise.resolve();
    }
    return delivery;
  }

  /** Queues, sends and (with qos) waits for the ACK of one line. */
  private async deliver(payload: string, qos: boolean, wait: boolean, signal: AbortSignal | undefined, key?: number): Promise<void> {
    // Nothing queued ahead and the protocol allows it: the line goes now (the common case).
    const sent =
      this.waiting.length === 0 && this.canAdmit(qos, wait)
        ? this.send(payload, qos, key)
        : await this.enqueue(payload, qos, wait, signal, key).catch((e: unknown) => {
            if (key !== undefined && e instanceof TetherError && e.code === 'ERR_ABORTED') this.journal?.dropped(key);
            throw e;
          });
    if (!sent) return;
    try {
      await raceAbort(sent.acked, signal, abortedError);
    } catch (e) {
      // Given up by the caller: stop retransmitting. The peer may or may not have it.
      // (Closing is not giving up: with persistence the message is sent after a restart.)
      if (this.pending.get(sent.mid) === sent && !this.closed) {
        this.pending.delete(sent.mid);
        if (key !== undefined) this.journal?.dropped(key);
        this.stateChanged();
      }
      throw e;
    }
  }

  /**
   * The next received line, with its trailing `\n` (as the original). Waits out
   * outages. `signal` abandons the wait (ERR_ABORTED); a line that arrives later
   * stays for the next reader.
   */
  readline(signal?: AbortSignal): Promise<string> {
    return this.next(signal, true);
  }

  /**
   * Like readline(), but the line stays on record (in the journal, with
   * `persist`) until commit(): if the server dies before the app commits, the
   * line is handed out again after the restart. Take, handle (record it, act on
   * it), then commit, and no line is lost to a crash; a line handled but not yet
   * committed when the process died is handed out twice. readline() commits
   * whatever was taken before it.
   */
  take(signal?: AbortSignal): Promise<string> {
    return this.next(signal, false);
  }

  /** Marks every line take() handed out so far as consumed (see take()). */
  commit(): void {
    for (; this.uncommitted > 0; this.uncommitted--) this.journal?.taken();
  }

  /** Lines handed out by take() and not yet committed. */
  private uncommitted = 0;

  private consumed(auto: boolean): void {
    if (!auto) {
      this.uncommitted++;
      return;
    }
    this.commit();
    this.journal?.taken();
  }

  private next(signal: AbortSignal | undefined, auto: boolean): Promise<string> {
    // An aborted reader takes nothing, not even a line that is already there.
    if (signal?.aborted) return Promise.reject(waitAbortedError('readline()')(signal.reason));
    const line = this.rx.shift();
    if (line !== undefined) {
      this.buffer(1 - line.length);
      this.consumed(auto);
      this.tookLine();
      return Promise.resolve(line);
    }
    if (this.closed) return Promise.reject(closedError(this.describe()));
    if (signal?.aborted) return Promise.reject(waitAbortedError('readline()')(signal.reason));
    return new Promise((resolve, reject) => {
      const reader: Reader = { resolve, reject, auto };
      if (signal) {
        const aborted = () => {
          const i = this.readers.indexOf(reader);
          if (i >= 0) this.readers.splice(i, 1);
          reject(waitAbortedError('readline()')(signal.reason));
        };
        signal.addEventListener('abort', aborted, { once: true });
        reader.resolve = (l) => {
          signal.removeEventListener('abort', aborted);
          resolve(l);
        };
        reader.reject = (e) => {
          signal.removeEventListener('abort', aborted);
          reject(e);
        };
      }
      this.readers.push(reader);
      if (this.held.length > 0) this.tookLine(); // held back by the shared budget: a reader takes it directly
    });
  }

  /** `for await (const line of conn)`: every received line (with `\n`) until close. */
  async *[Symbol.asyncIterator](): AsyncGenerator<string, void, undefined> {
    for (;;) {
      try {
        yield await this.readline();
      } catch (e) {
        if (e instanceof TetherError && e.code === 'ERR_CLOSED') return;
        throw e;
      }
    }
  }

  /** Ends the link for good: pending writes and readers reject with ERR_CLOSED. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.dropLink('closed');
    // Lines left unread stay readable but no longer count against the shared budget.
    if (this.budget) this.budget.used -= this.rxBytes;
    this.budget = undefined;
    const err = closedError(this.describe());
    // Queued writes reject (with persistence they stay in the journal for the next run).
    for (const w of this.waiting.splice(0)) {
      w.unlink?.();
      w.reject(err);
    }
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    for (const r of this.readers.splice(0)) r.reject(err);
    this.stateChanged();
    this.emit('close');
  }

  get isClosed(): boolean {
    return this.closed;
  }

  // ---- for subclasses ---------------------------------------------------

  /**
   * Takes up the state a journal kept across a restart: id counter, duplicate
   * ring, unread lines, and qos messages to deliver (resent under their old id
   * if they had gone out). Call before the first link.
   */
  protected restore(r: RestoredState): void {
    this.mids = new MidGenerator(r.nextMid);
    this.filter.ring.restore(r.ring);
    this.filter.lastMid0 = r.lastMid0;
    this.nextKey = r.nextKey;
    for (const line of r.inbound) {
      this.rx.push(line + '\n');
      this.buffer(line.length);
    }
    for (const o of r.outbound) {
      if (o.mid === undefined) {
        this.deliver(o.payload, true, o.wait, undefined, o.key).catch(() => {});
        continue;
      }
      const d = deferred();
      d.promise.catch(() => {});
      const wire = formatMessage(o.mid, o.payload);
      this.seq++;
      this.pending.set(o.mid, { mid: o.mid, wire, seq: this.seq, key: o.key, firstSent: Date.now(), sentAt: 0, acked: d.promise, resolve: d.resolve, reject: d.reject });
    }
  }

  protected abstract describe(): string;

  /** Called after a link is dropped (`wasUp`: it had come up). */
  protected onLinkLost(_reason: string, _wasUp: boolean): void {}

  /** True while a link is attached, up or not. */
  protected get linked(): boolean {
    return this.link !== null;
  }

  /**
   * Takes a fresh link. `upNow`: the server side is up at once and greets with a
   * keepalive; the client side waits for the peer's first line. `settleDelay`: ms
   * to wait after the first bytes from the peer before sending messages.
   */
  protected attachLink(link: Link, rest: Buffer | undefined, upNow: boolean, settleDelay: number): void {
    if (this.closed) {
      link.close('endpoint closed');
      return;
    }
    if (this.link) this.dropLink('replaced by a new link');
    this.link = link;
    this.linkLimit = link.maxLineLength === undefined ? null : { max: link.maxLineLength, remote: link.remote };
    this.linkId = nanoid(8);
    this.linkViolated = false;
    this.splitter = new LineSplitter(this.maxLineLength);
    this.filter.newLink(this.peerBoot);
    this.settleDelay = settleDelay;
    this.lastRx = Date.now();
    link.setHandlers({
      data: (chunk) => this.onData(chunk),
      close: (reason) => this.dropLink(reason),
      drain: () => {
        this.congested = false;
        this.stateChanged();
      },
    });
    this.tick = setInterval(() => this.onTick(), Math.max(1, Math.floor(this.timeout / 4)));
    this.tick.unref?.();
    if (upNow) this.markUp();
    if (rest && rest.length > 0) this.onData(rest);
  }

  /** Sends raw protocol bytes on the current link (no-op without one). */
  protected sendRaw(data: string): void {
    const link = this.link;
    if (!link) return;
    this.counters.bytesOut += Buffer.byteLength(data);
    if (!link.write(data)) this.congested = true;
  }

  /** Drops the current link (if any) and registers the outage. */
  protected dropLink(reason: string): void {
    const link = this.link;
    if (!link) return;
    this.link = null;
    link.setHandlers(null);
    link.close(reason);
    if (this.tick) clearInterval(this.tick);
    if (this.settleTimer) clearTimeout(this.settleTimer);
    this.tick = this.settleTimer = null;
    const wasUp = this.up;
    this.up = this.settled = this.gotData = this.congested = this.blocked = false;
    // Messages not ACKed yet belong to the peer: it sends them again on its next link.
    this.parked = null;
    this.backlog = [];
    this.held.length = 0;
    this.heldBytes = 0;
    if (wasUp) {
      if (!this.closed) this.counters.outages++;
      this.log.info('link down', { remote: link.remote, link: this.linkId, reason });
      this.emit('down', reason);
    }
    this.stateChanged();
    this.onLinkLost(reason, wasUp);
  }

  // ---- internals ----------------------------------------------------------

  private settleDelay = 0;

  private markUp(): void {
    if (this.up) return;
    this.up = true;
    this.counters.connects++;
    this.sendKeepalive();
    this.log.info('link up', { remote: this.link?.remote, link: this.linkId, connects: this.counters.connects });
    this.emit('up');
    this.afterSettle();
    this.stateChanged();
  }

  private sendKeepalive(): void {
    this.counters.keepalivesOut++;
    this.sendRaw(KEEPALIVE);
  }

  private onData(chunk: Buffer): void {
    this.counters.bytesIn += chunk.length;
    this.lastRx = this.lastSeen = Date.now();
    if (!this.gotData) {
      this.gotData = true;
      if (this.settleDelay > 0) {
        this.settleTimer = setTimeout(() => {
          this.settleTimer = null;
          this.settled = true;
          this.afterSettle();
        }, this.settleDelay);
      } else {
        this.settled = true;
        this.afterSettle();
      }
    }
    if (this.blocked) this.backlog.push(chunk); // a read already under way when the link was paused
    else this.feed(chunk);
  }

  /** Splits `chunk` into lines; if a message does not fit, keeps the rest for when reading resumes. */
  private feed(chunk: Buffer): void {
    const stop = this.splitter.push(chunk, this.onLine, this.onLongLine);
    if (stop >= 0 && stop < chunk.length) this.backlog.unshift(chunk.subarray(stop));
  }

  private readonly onLongLine = (head: Buffer): void => {
    this.counters.longLines++;
    const mid = head.length === 2 ? parseMid(head) : -1;
    throttledWarn(this.log, 'a line longer than maxLineLength was dropped', {
      limit: 'maxLineLength',
      remote: this.link?.remote,
      maxLineLength: this.maxLineLength,
      mid: mid >= 0 ? mid : undefined,
      hint:
        mid >= 0
          ? 'the message was ACKed so the sender goes on, and reported to the app as "oversize": shorten what the peer sends or raise maxLineLength'
          : 'shorten what the peer sends or raise maxLineLength',
    });
    // A message (it starts with a message id): ACK it in turn, so the peer's write
    // completes and its later messages go out, and report it instead of delivering it.
    // It costs no buffer: if even the hold has no place for it, it is ACKed and reported at once.
    if (mid >= 0 && this.link && !this.onMessage(mid, OVERSIZE, 0)) this.admit(mid, OVERSIZE);
  };

  /** Takes one line from the peer; false stops the splitter (the line is parked). */
  private readonly onLine = (line: Buffer): boolean => {
    if (!this.link) return true; // the link died while this chunk was being split
    // Keepalives and ACKs, most of the traffic, are recognised without allocating.
    if (line.length === 0) {
      this.counters.keepalivesIn++;
      if (!this.up) this.markUp();
      return true;
    }
    if (line.length === 2) {
      const mid = parseMid(line);
      if (mid >= 0) {
        this.onAck(mid);
        if (!this.up && this.link) this.markUp();
        return true;
      }
    }
    const p = parseLine(line);
    switch (p.kind) {
      case 'keepalive':
        this.counters.keepalivesIn++;
        break;
      case 'ack':
        this.onAck(p.mid);
        break;
      case 'message':
        if (!this.onMessage(p.mid, p.payload, line.length)) {
          this.parked = line;
          this.blocked = true;
          this.link.pause();
          this.log.debug('receive buffer and hold full: reading paused until the app reads', { buffered: this.rx.length, held: this.held.length });
          return false;
        }
        break;
      case 'invalid':
        this.counters.badLines++;
        throttledWarn(this.log, 'dropped a bad line', { remote: this.link?.remote, reason: p.reason, line: preview(line) });
        if (!this.linkViolated) {
          this.linkViolated = true;
          this.emit('violation', 'badLine', this.link);
        }
        break;
    }
    // The client side counts the peer's first line as the link coming up.
    if (!this.up && this.link) this.markUp();
    return true;
  };

  private onAck(mid: number): void {
    this.counters.acksIn++;
    const sent = this.pending.get(mid);
    if (!sent) return; // an ACK of a message sent without qos, or a late one
    this.pending.delete(mid);
    if (sent.key !== undefined) this.journal?.acked(sent.key);
    sent.resolve();
    this.stateChanged();
  }

  /**
   * Hands every new message to `consumer` instead of queueing it for readline(),
   * and ACKs it to the peer only once the consumer's promise resolves (an MQTT
   * bridge resolves when the broker has the message): what the peer sees
   * acknowledged is already safe elsewhere. A consumer that returns null refuses
   * the message: no ACK, not recorded, so the peer sends it again later. While a
   * message is being handed on, its retransmissions are neither ACKed nor handed
   * on again. Confirmations are applied in arrival order. Persistence of received
   * lines is then the consumer's business (they are not journaled). null turns
   * it off.
   */
  setConsumer(consumer: Consumer | null): void {
    this.consumer = consumer;
    if (!consumer) return;
    // Messages held un-ACKed go to the consumer now, in their order; reading resumes.
    const held = this.held.splice(0);
    this.heldBytes = 0;
    for (const h of held) this.onMessage(h.mid, h.payload, h.bytes);
    if (this.stalledNow) this.setStalled(false);
    this.unblock();
  }

  /** True while a consumer takes new messages (see setConsumer). */
  get hasConsumer(): boolean {
    return this.consumer !== null;
  }

  private onConsumed(mid: number, payload: string): void {
    // Still being handed on: its ACK follows (a mid 0 only on the same link or boot: otherwise the peer restarted).
    if (this.handing.some((h) => !h.stale && h.mid === mid && h.payload === payload) && (mid !== 0 || this.filter.isRepeat(0, payload))) {
      this.counters.duplicatesDropped++;
      return;
    }
    // Decided on arrival, in arrival order and with this link and boot id, as the peer's ring evolves;
    // only the ACK waits for the consumer.
    let fresh = this.filter.accept(mid, payload);
    if (!fresh && this.toRetry.get(mid) === payload) fresh = true; // its hand-over failed: the resend is new to the consumer
    this.toRetry.delete(mid);
    if (!fresh) {
      this.counters.duplicatesDropped++;
      this.counters.acksOut++;
      this.sendRaw(formatAck(mid));
      return;
    }
    if (mid === 0) {
      // The peer restarted: ACKs for what its previous run sent must not reach this run (they would ACK its new mids).
      for (const h of this.handing) h.stale = true;
      this.toRetry.clear();
    }
    const line = payload + '\n';
    let handed: Promise<void> | null;
    try {
      handed = this.consumer!(line, mid);
    } catch (e) {
      this.toRetry.set(mid, payload);
      this.log.error('the consumer threw: message not ACKed (the peer resends it)', { error: (e as Error).stack ?? String(e) });
      return;
    }
    if (handed === null) {
      this.toRetry.set(mid, payload);
      this.counters.shed++;
      return;
    }
    const entry = { mid, payload, done: false, failed: false, stale: false };
    this.handing.push(entry);
    this.counters.messagesIn++;
    try {
      this.emit('line', line);
    } catch (e) {
      this.log.error('a "line" listener threw; the line is still delivered', { error: (e as Error).stack ?? String(e) });
    }
    handed.then(
      () => {
        entry.done = true;
        this.ackHanded();
      },
      (err: Error) => {
        entry.failed = true;
        if (!entry.stale) this.toRetry.set(mid, payload);
        throttledWarn(this.log, 'message not handed on: not ACKed, the peer resends it', { mid, error: err?.message });
        this.ackHanded(); // later ones that were waiting behind it
      },
    );
  }

  /** ACKs confirmed messages in arrival order; a failed one is skipped (the peer resends it), a stale one (sent by the peer's previous run) never ACKed. */
  private ackHanded(): void {
    while (this.handing.length > 0 && (this.handing[0].done || this.handing[0].failed)) {
      const h = this.handing.shift()!;
      if (h.failed || h.stale || this.closed) continue;
      this.counters.acksOut++;
      this.sendRaw(formatAck(h.mid));
    }
  }

  /**
   * One received message. With room in the buffer (and nothing held before it)
   * it is taken at once; otherwise it waits un-ACKed in the hold, in arrival
   * order. False: the hold is full too and reading should pause (no write of
   * ours awaits an ACK, so nothing needs the bytes behind it yet).
   */
  private onMessage(mid: number, payload: string, bytes: number): boolean {
    if (this.consumer) {
      if (payload === OVERSIZE) this.admit(mid, payload); // ACKed and reported, never handed on
      else this.onConsumed(mid, payload);
      return true;
    }
    if (this.held.length === 0 && this.hasRoom(bytes)) {
      this.admit(mid, payload);
      return true;
    }
    for (const h of this.held) {
      // Sent again while held (the peer's retransmission timer): its ACK follows when it is taken.
      if (h.mid === mid && h.payload === payload) {
        this.counters.duplicatesDropped++;
        return true;
      }
    }
    if (this.held.length < this.rxHold && (this.held.length === 0 || this.heldBytes + bytes <= this.rxBufferBytes)) {
      this.held.push({ mid, payload, bytes });
      this.heldBytes += bytes;
      return true;
    }
    if (this.filter.isRepeat(mid, payload)) {
      // A resend of a message taken long ago (our ACK was lost): ACK it even now, so the peer's slot frees.
      this.counters.duplicatesDropped++;
      this.counters.acksOut++;
      this.sendRaw(formatAck(mid));
      return true;
    }
    if (this.pending.size === 0) return false;
    // Our own writes await ACKs that may sit behind this message: read on, refusing it.
    this.counters.shed++;
    throttledWarn(this.log, 'receive buffer full and the app is not reading: a message was refused without ACK (the peer resends it)', {
      limit: 'rxBuffer',
      remote: this.link?.remote,
      buffered: this.rx.length,
      held: this.held.length,
      hint: 'read lines promptly (for await … of conn), or raise rxBuffer / rxHold',
    });
    return true;
  }

  private hasRoom(bytes: number): boolean {
    if (this.readers.length > 0) return true; // handed over at once, never buffered
    if (this.budget && this.budget.used + bytes > this.budget.max) {
      if (!this.budget.full) {
        this.budget.full = true;
        throttledWarn(this.log, 'received lines waiting for apps reached maxBufferedBytes: new messages wait un-ACKed until apps read', {
          limit: 'maxBufferedBytes',
          used: this.budget.used,
          maxBufferedBytes: this.budget.max,
          hint: 'apps are not reading (see stalled devices), or raise maxBufferedBytes',
        });
      }
      return false;
    }
    if (this.budget) this.budget.full = false;
    return this.rx.length === 0 || (this.rx.length < this.rxBuffer && this.rxBytes + bytes <= this.rxBufferBytes);
  }

  /** Records, ACKs and hands on one message (or drops it as a repeat). */
  private admit(mid: number, payload: string): void {
    const fresh = this.filter.accept(mid, payload);
    // Recorded before the ACK goes out: nothing the peer sees as delivered is lost in a crash.
    if (payload !== OVERSIZE) this.journal?.received(mid, payload, fresh);
    this.counters.acksOut++;
    this.sendRaw(formatAck(mid));
    if (!fresh) {
      this.counters.duplicatesDropped++;
      this.log.debug('duplicate dropped', { mid });
      return;
    }
    if (payload === OVERSIZE) {
      this.emit('oversize', mid, this.maxLineLength);
      return;
    }
    this.counters.messagesIn++;
    const line = payload + '\n';
    // Queued (or handed to a reader) before observers hear of it: a 'line' listener that writes
    // or reads re-enters this endpoint and must find the line in its place.
    const reader = this.readers.shift();
    if (reader) {
      this.consumed(reader.auto);
      this.lastTaken = Date.now();
      reader.resolve(line);
    } else {
      this.rx.push(line);
      this.buffer(payload.length);
    }
    try {
      this.emit('line', line);
    } catch (e) {
      // An observer's bug must not take the link (or the process) down.
      this.log.error('a "line" listener threw; the line is still delivered', { error: (e as Error).stack ?? String(e) });
    }
  }

  /** Counts `n` characters into (or, negative, out of) this endpoint's buffer and the shared budget. */
  private buffer(n: number): void {
    this.rxBytes += n;
    if (this.budget) this.budget.used += n;
  }

  /** The app took a line: take held messages into the room it made, and read on if reading was paused. */
  private tookLine(): void {
    this.lastTaken = Date.now();
    while (this.held.length > 0 && this.hasRoom(this.held[0].bytes)) {
      const h = this.held.shift()!;
      this.heldBytes -= h.bytes;
      this.admit(h.mid, h.payload);
    }
    if (this.stalledNow) this.setStalled(false);
    if (this.blocked && this.held.length <= this.rxHold / 2) this.unblock();
  }

  /** Resumes reading a paused link: the parked line first, then the bytes behind it. */
  private unblock(): void {
    if (!this.blocked || this.unblocking) return;
    this.unblocking = true;
    try {
      this.blocked = false;
      this.lastRx = Date.now(); // silence while paused was ours, not the peer's
      const parked = this.parked;
      this.parked = null;
      if (parked && !this.onLine(parked)) return;
      while (!this.blocked && this.backlog.length > 0) this.feed(this.backlog.shift()!);
      if (!this.blocked) this.link?.resume();
    } finally {
      this.unblocking = false;
    }
  }

  private setStalled(on: boolean): void {
    this.stalledNow = on;
    if (on) {
      this.counters.stalls++;
      throttledWarn(this.log, 'stalled: nobody is reading this device\'s lines', {
        limit: 'rxBuffer',
        remote: this.link?.remote,
        buffered: this.rx.length,
        held: this.held.length,
        idleMs: Date.now() - Math.max(this.lastTaken, this.fullSince),
        hint: 'the app for this device is gone, failed or slow; its lines wait (un-ACKed beyond rxBuffer) until something reads them',
      });
    } else {
      this.log.info('reading again: the device is no longer stalled', { buffered: this.rx.length });
    }
    this.emit('stalled', on);
  }

  private onTick(): void {
    const now = Date.now();
    // While reading is paused by our own backpressure, silence proves nothing.
    if (!this.blocked) {
      const limit = this.up ? this.timeout : 2 * this.timeout;
      if (now - this.lastRx > limit) {
        this.dropLink(`no data for ${now - this.lastRx} ms (timeout ${limit} ms)`);
        return;
      }
    }
    const full = this.held.length > 0 || this.blocked || this.rx.length >= this.rxBuffer;
    if (!full) {
      this.fullSince = 0;
      if (this.stalledNow) this.setStalled(false);
    } else if (this.fullSince === 0) this.fullSince = now;
    else if (!this.stalledNow && this.readers.length === 0 && now - Math.max(this.fullSince, this.lastTaken) >= this.stallAfter) this.setStalled(true);
    if (!this.up) return;
    this.sendKeepalive();
    if (!this.settled || this.pending.size === 0) return;
    for (const p of this.pending.values()) {
      if (now - p.sentAt >= this.timeout) this.resend(p, now);
    }
  }

  private resend(p: Pending, now: number): void {
    p.sentAt = now;
    this.counters.retransmits++;
    this.sendRaw(p.wire);
  }

  /** Runs when the link becomes usable for messages: resend what the last link left unacknowledged. */
  private afterSettle(): void {
    if (!this.up || !this.settled) return;
    const now = Date.now();
    for (const p of this.pending.values()) this.resend(p, now);
    this.stateChanged();
  }

  private canAdmit(qos: boolean, wait: boolean): boolean {
    if (!this.up || !this.settled || this.congested) return false;
    const n = this.pending.size;
    if (n > 0) {
      const oldest = this.pending.values().next().value as Pending;
      if (this.seq - oldest.seq >= MAX_MID_SPAN) return false;
    }
    if (!qos) return true;
    return wait ? n === 0 : n < this.window;
  }

  /** Queues a write until pump() sends it; it keeps its place however long the link is down. */
  private enqueue(payload: string, qos: boolean, wait: boolean, signal?: AbortSignal, key?: number): Promise<Pending | null> {
    return new Promise((resolve, reject) => {
      const w: Waiting = { payload, qos, wait, key, resolve, reject };
      if (signal) {
        const aborted = () => {
          const i = this.waiting.indexOf(w);
          if (i >= 0) this.waiting.splice(i, 1);
          reject(abortedError(signal.reason));
          this.stateChanged();
        };
        signal.addEventListener('abort', aborted, { once: true });
        w.unlink = () => signal.removeEventListener('abort', aborted);
      }
      this.waiting.push(w);
    });
  }

  /**
   * Sends queued writes, in order, for as long as the protocol allows (link up
   * and settled, the window and the id span not exhausted). Synchronous: no
   * promise hop per message on this hot path.
   */
  private pump(): void {
    while (this.waiting.length > 0) {
      const w = this.waiting[0];
      if (!this.canAdmit(w.qos, w.wait)) break;
      this.waiting.shift();
      w.unlink?.();
      w.resolve(this.send(w.payload, w.qos, w.key));
    }
    if (this.waiting.length < this.maxQueuedWrites) this.room.notify();
  }

  /** Something that may let writes go or readers wake changed. */
  private stateChanged(): void {
    this.pump();
    this.changed.notify();
  }

  /** Gives the line its id and puts it on the wire (canAdmit() holds). Emits `sent` (payload, mid). */
  private send(payload: string, qos: boolean, key?: number): Pending | null {
    const mid = this.mids.take();
    if (this.listenerCount('sent') > 0) this.emit('sent', payload, mid);
    const wire = formatMessage(mid, payload);
    this.seq++;
    this.counters.messagesOut++;
    let sent: Pending | null = null;
    if (qos) {
      const d = deferred();
      d.promise.catch(() => {}); // observed by write(); never an unhandled rejection
      const now = Date.now();
      sent = { mid, wire, seq: this.seq, key, firstSent: now, sentAt: now, acked: d.promise, resolve: d.resolve, reject: d.reject };
      this.pending.set(mid, sent);
      // Its id is recorded before it goes out, so a restarted server resends it under the same id.
      if (key !== undefined) this.journal?.sent(key, mid);
    }
    this.sendRaw(wire);
    // Its ACK must be read even if the app is not reading: refuse what does not fit instead of pausing.
    if (qos && this.blocked) this.unblock();
    return sent;
  }
}
