/**
 * A hand-driven protocol peer on a raw socket: sends exact bytes, records every
 * line it receives with its arrival time, and lets a test wait for lines.
 */
import * as net from 'node:net';

export interface Received {
  line: string;
  at: number;
}

export class RawPeer {
  readonly received: Received[] = [];
  private partial = '';
  private cursor = 0;
  private waiters: Array<() => void> = [];
  closedAt: number | null = null;
  readonly closed: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.setEncoding('latin1');
    socket.on('data', (s: string) => {
      const now = Date.now();
      const parts = (this.partial + s).split('\n');
      this.partial = parts.pop()!;
      for (const line of parts) this.received.push({ line, at: now });
      this.wake();
    });
    socket.on('error', () => {});
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.closedAt = Date.now();
        this.wake();
        resolve();
      }),
    );
  }

  /** Wraps an accepted socket (to play the server against a client). */
  static wrap(socket: net.Socket): RawPeer {
    return new RawPeer(socket);
  }

  static connect(port: number, host = '127.0.0.1'): Promise<RawPeer> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ port, host }, () => resolve(new RawPeer(s)));
      s.once('error', reject);
    });
  }

  /** Connects and sends `id\n` (plus `extra` in the same write). */
  static async hello(port: number, id: string, extra = ''): Promise<RawPeer> {
    const p = await RawPeer.connect(port);
    p.send(id + '\n' + extra);
    return p;
  }

  send(s: string | Buffer): void {
    this.socket.write(s);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private waitChange(deadline: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const left = deadline - Date.now();
      if (left <= 0) return reject(new Error('timed out'));
      const t = setTimeout(() => reject(new Error('timed out')), left);
      this.waiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }

  /**
   * The next received line (after those already taken) that is not a keepalive,
   * waiting up to `ms`. Keepalives passed over are consumed.
   */
  async next(ms = 5000, skipKeepalives = true): Promise<Received> {
    const deadline = Date.now() + ms;
    for (;;) {
      while (this.cursor < this.received.length) {
        const r = this.received[this.cursor++];
        if (!(skipKeepalives && r.line === '')) return r;
      }
      if (this.closedAt !== null) throw new Error('socket closed while waiting for a line');
      await this.waitChange(deadline).catch(() => {
        throw new Error(`no line within ${ms} ms (received so far: ${JSON.stringify(this.received.map((r) => r.line))})`);
      });
    }
  }

  /** Lines received so far that have not been taken by next(), keepalives included. */
  untaken(): string[] {
    return this.received.slice(this.cursor).map((r) => r.line);
  }

  /** Waits until `pred` holds over everything received, up to `ms`. */
  async until(pred: (lines: string[]) => boolean, ms = 5000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!pred(this.received.map((r) => r.line))) {
      await this.waitChange(deadline).catch(() => {
        throw new Error(`condition not met within ${ms} ms`);
      });
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

export { eventually } from './wait';
