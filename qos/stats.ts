/**
 * Statistics of the qos demo's numbered messages, kept by the receiver per peer
 * (the job the original demo's CheckMid did). Pure: no I/O, no clock.
 *
 * A message is `{"n": <count from 0>, "boot": "<the sender's run>"}`. Per peer:
 * - received:    messages read (duplicates included, unreadable lines not);
 * - duplicates:  an n already received from the same run;
 * - missing:     n skipped over and never filled since (gaps below the highest n), plus
 *                the gaps an earlier run of the peer left behind;
 * - outOfOrder:  an n that arrived after a higher one (it fills a gap);
 * - restarts:    the peer started a new run: its boot changed (or, for a message without
 *                boot, n went back to 0);
 * - invalid:     lines that are not qos messages.
 * The first message ever seen from a peer starts the count wherever it is (the
 * receiver may have joined late); after a restart, counting starts again from 0.
 */

export interface QosMessage {
  n: number;
  boot?: string;
}

/** What one received line was. `skip`: new, but it jumped over some numbers. `late`: it filled an earlier gap. */
export type Outcome = 'first' | 'new' | 'skip' | 'late' | 'duplicate' | 'restart' | 'invalid';

/** A gap wider than this is counted but not tracked number by number (bounded memory). */
export const MAX_TRACKED_GAP = 10_000;

export function encodeQos(n: number, boot: string): string {
  return JSON.stringify({ n, boot });
}

/** The message in a line, or null if it is not one. */
export function parseQos(line: string): QosMessage | null {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    return null;
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) return null;
  const { n, boot } = v as Record<string, unknown>;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) return null;
  if (boot !== undefined && typeof boot !== 'string') return null;
  return boot === undefined ? { n } : { n, boot };
}

export class PeerStats {
  received = 0;
  duplicates = 0;
  outOfOrder = 0;
  restarts = 0;
  invalid = 0;
  /** Messages this side sent to the peer and had acknowledged (kept by the sender, for the summary). */
  sent = 0;
  /** The peer's current run, as last seen. */
  boot: string | undefined = undefined;
  /** Highest n received in the current run (-1: none yet). */
  last = -1;
  private started = false;
  private readonly gaps = new Set<number>();
  /** Gaps left by earlier runs, and gaps too wide to track. */
  private lostForGood = 0;

  get missing(): number {
    return this.lostForGood + this.gaps.size;
  }

  /** Distinct messages received. */
  get unique(): number {
    return this.received - this.duplicates;
  }

  /** Takes one received line. */
  takeLine(line: string): Outcome {
    const m = parseQos(line);
    if (!m) {
      this.invalid++;
      return 'invalid';
    }
    return this.take(m);
  }

  take(m: QosMessage): Outcome {
    this.received++;
    const { n, boot } = m;
    if (!this.started) {
      this.started = true;
      this.boot = boot;
      this.last = n;
      return 'first';
    }
    const restart = boot !== undefined || this.boot !== undefined ? boot !== this.boot : n === 0 && this.last > 0;
    if (restart) {
      this.restarts++;
      this.lostForGood += this.gaps.size;
      this.gaps.clear();
      this.boot = boot;
      this.last = -1;
      this.advance(n);
      return 'restart';
    }
    if (n > this.last) return this.advance(n) ? 'skip' : 'new';
    if (this.gaps.delete(n)) {
      this.outOfOrder++;
      return 'late';
    }
    this.duplicates++;
    return 'duplicate';
  }

  /** Moves the highest n up to `n`, opening gaps for what was skipped; true if any was. */
  private advance(n: number): boolean {
    const skipped = n - this.last - 1;
    if (skipped > MAX_TRACKED_GAP) this.lostForGood += skipped;
    else for (let i = this.last + 1; i < n; i++) this.gaps.add(i);
    this.last = n;
    return skipped > 0;
  }
}

export interface Totals {
  peers: number;
  sent: number;
  received: number;
  duplicates: number;
  missing: number;
  outOfOrder: number;
  restarts: number;
  invalid: number;
}

/** PeerStats by peer name (a client ID). */
export class QosStats {
  private readonly byPeer = new Map<string, PeerStats>();

  /** The stats of `peer`, created on first use. */
  peer(peer: string): PeerStats {
    let s = this.byPeer.get(peer);
    if (!s) this.byPeer.set(peer, (s = new PeerStats()));
    return s;
  }

  take(peer: string, line: string): Outcome {
    return this.peer(peer).takeLine(line);
  }

  /** Peers in name order (numbers in a name sort as numbers). */
  peers(): Array<[string, PeerStats]> {
    return [...this.byPeer].sort(([a], [b]) => a.localeCompare(b, 'en', { numeric: true }));
  }

  totals(): Totals {
    const t: Totals = { peers: 0, sent: 0, received: 0, duplicates: 0, missing: 0, outOfOrder: 0, restarts: 0, invalid: 0 };
    for (const s of this.byPeer.values()) {
      t.peers++;
      t.sent += s.sent;
      t.received += s.received;
      t.duplicates += s.duplicates;
      t.missing += s.missing;
      t.outOfOrder += s.outOfOrder;
      t.restarts += s.restarts;
      t.invalid += s.invalid;
    }
    return t;
  }

  /** One line per peer, as a table with a header. */
  table(title = 'peer'): string {
    const rows = this.peers().map(([p, s]) => [p, s.sent, s.received, s.duplicates, s.missing, s.outOfOrder, s.restarts, s.invalid]);
    return renderTable([title, 'sent', 'received', 'dupes', 'missing', 'out of order', 'restarts', 'invalid'], rows);
  }
}

/** Plain text columns: the first left-aligned, the others right-aligned. */
export function renderTable(head: string[], rows: Array<Array<string | number>>): string {
  const all = [head, ...rows.map((r) => r.map(String))];
  const w = head.map((_, i) => Math.max(...all.map((r) => (r[i] ?? '').length)));
  return all.map((r) => r.map((c, i) => (i === 0 ? c.padEnd(w[i]) : c.padStart(w[i]))).join('  ').trimEnd()).join('\n');
}
