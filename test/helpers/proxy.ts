/**
 * A TCP proxy that injects the faults WiFi produces: an abrupt cut (both sockets
 * destroyed) and a silent blackhole (bytes dropped both ways, sockets left open,
 * so only keepalive timeouts can notice). Counts what it injected.
 */
import * as net from 'node:net';

interface Pair {
  a: net.Socket;
  b: net.Socket;
  dead: boolean;
}

export class FaultProxy {
  readonly injected = { cuts: 0, blackholes: 0 };
  private readonly pairs = new Set<Pair>();
  private readonly server: net.Server;

  private constructor(private readonly target: number) {
    this.server = net.createServer((a) => {
      const b = net.connect({ port: this.target, host: '127.0.0.1' });
      const pair: Pair = { a, b, dead: false };
      this.pairs.add(pair);
      const forward = (from: net.Socket, to: net.Socket) => {
        from.on('data', (d) => {
          if (!pair.dead) to.write(d);
        });
        // A live pair passes closes through; a blackholed one keeps the other side hanging.
        from.on('close', () => {
          if (!pair.dead) to.destroy();
          if (a.destroyed && b.destroyed) this.pairs.delete(pair);
        });
        from.on('error', () => {});
      };
      forward(a, b);
      forward(b, a);
    });
  }

  static async start(targetPort: number): Promise<FaultProxy> {
    const p = new FaultProxy(targetPort);
    await new Promise<void>((r) => p.server.listen(0, '127.0.0.1', () => r()));
    return p;
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  /** Live (not blackholed) connections through the proxy. */
  get live(): number {
    return [...this.pairs].filter((p) => !p.dead).length;
  }

  /** Destroys every live connection at once. */
  cut(): void {
    for (const p of this.pairs) {
      if (p.dead) continue;
      p.a.destroy();
      p.b.destroy();
      this.injected.cuts++;
    }
  }

  /** Silently drops all further bytes of every live connection; the sockets stay open. */
  blackhole(): void {
    for (const p of this.pairs) {
      if (p.dead) continue;
      p.dead = true;
      this.injected.blackholes++;
    }
  }

  async close(): Promise<void> {
    for (const p of this.pairs) {
      p.a.destroy();
      p.b.destroy();
    }
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}
