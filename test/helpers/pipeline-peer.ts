/**
 * A device-side peer written from the protocol description alone (it uses none
 * of tether's protocol code): it keeps `window` qos messages outstanding (closed
 * loop: the next goes when one is ACKed), ACKs every message it receives,
 * filters repeats with its own 256-bit ring, retransmits after `timeout`, and
 * sends keepalives. It records what a user of a pipelining client would notice:
 * ACK latency, retransmissions, and messages delivered to it twice.
 */
import * as net from 'node:net';

export interface PeerStats {
  sent: number;
  acked: number;
  retransmits: number;
  /** Longest time from first sending a message to its ACK (ms). */
  ackMax: number;
  /** Server messages taken as new. */
  delivered: number;
  /** Server messages whose payload had been delivered before (the ring let a repeat through). */
  deliveredTwice: number;
  /** Server messages the ring recognised as repeats (ACKed, dropped). */
  repeatsDropped: number;
}

export class PipelinePeer {
  readonly stats: PeerStats = { sent: 0, acked: 0, retransmits: 0, ackMax: 0, delivered: 0, deliveredTwice: 0, repeatsDropped: 0 };
  /** Payloads of server messages, in the order delivered. */
  readonly inbox: string[] = [];
  private readonly seen = new Set<string>();
  private readonly ring = new Uint8Array(32);
  private readonly outstanding = new Map<number, { wire: string; first: number; last: number }>();
  private nextMid = 0;
  private made = 0;
  private partial = '';
  private lastWrite = 0;
  private timer: NodeJS.Timeout | null = null;
  private started = false;
  private done!: () => void;
  /** Resolves when all `count` messages are ACKed. */
  readonly finished = new Promise<void>((r) => (this.done = r));

  private constructor(
    private readonly socket: net.Socket,
    readonly id: string,
    private readonly opts: { window: number; timeout: number; count: number; payload?: (n: number) => string },
  ) {
    socket.setEncoding('latin1');
    socket.setNoDelay(true);
    socket.on('data', (s: string) => this.onData(s));
    socket.on('error', () => {});
    socket.on('close', () => this.stop());
  }

  static connect(port: number, id: string, opts: { window: number; timeout: number; count: number; payload?: (n: number) => string }): Promise<PipelinePeer> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ port, host: '127.0.0.1' }, () => {
        const p = new PipelinePeer(s, id, opts);
        p.write(id + '\n');
        resolve(p);
      });
      s.once('error', reject);
    });
  }

  private write(s: string): void {
    this.lastWrite = Date.now();
    this.socket.write(s);
  }

  private onData(s: string): void {
    const parts = (this.partial + s).split('\n');
    this.partial = parts.pop()!;
    for (const line of parts) this.onLine(line);
    if (!this.started) {
      // Like the original client: nothing but the ID line until the server has spoken.
      this.started = true;
      this.timer = setInterval(() => this.tick(), Math.floor(this.opts.timeout / 4));
      this.pump();
    }
  }

  private onLine(line: string): void {
    if (line.length === 0) return; // keepalive
    const mid = parseInt(line.slice(0, 2), 16);
    if (line.length === 2) {
      const o = this.outstanding.get(mid);
      if (!o) return;
      this.outstanding.delete(mid);
      this.stats.acked++;
      this.stats.ackMax = Math.max(this.stats.ackMax, Date.now() - o.first);
      if (this.stats.acked === this.opts.count) this.done();
      this.pump();
      return;
    }
    this.write(line.slice(0, 2) + '\n');
    if (!this.isNew(mid)) {
      this.stats.repeatsDropped++;
      return;
    }
    const payload = line.slice(2);
    if (this.seen.has(payload)) this.stats.deliveredTwice++;
    this.seen.add(payload);
    this.stats.delivered++;
    this.inbox.push(payload);
  }

  /** The original's ring: mid 0 clears it; a new id sets its bit and clears the byte half a ring away. */
  private isNew(mid: number): boolean {
    if (mid === 0) this.ring.fill(0);
    const idx = mid >> 3;
    const bit = 1 << (mid & 7);
    const fresh = (this.ring[idx] & bit) === 0;
    this.ring[idx] |= bit;
    this.ring[(idx + 16) & 31] = 0;
    return fresh;
  }

  private pump(): void {
    while (this.outstanding.size < this.opts.window && this.made < this.opts.count) {
      const mid = this.nextMid;
      this.nextMid = mid === 255 ? 1 : mid + 1;
      const payload = this.opts.payload ? this.opts.payload(this.made) : `${this.id}-${this.made}`;
      this.made++;
      const wire = mid.toString(16).padStart(2, '0') + payload + '\n';
      const now = Date.now();
      this.outstanding.set(mid, { wire, first: now, last: now });
      this.stats.sent++;
      this.write(wire);
    }
  }

  private tick(): void {
    const now = Date.now();
    for (const o of this.outstanding.values()) {
      if (now - o.last >= this.opts.timeout) {
        o.last = now;
        this.stats.retransmits++;
        this.write(o.wire);
      }
    }
    if (now - this.lastWrite >= this.opts.timeout / 4) this.write('\n');
  }

  private stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  close(): void {
    this.stop();
    this.socket.destroy();
  }
}
