/**
 * A real Mosquitto broker for tests and benchmarks: started on a free loopback
 * port with a generated config (anonymous, persistence in a temp folder), and
 * stopped (SIGTERM, so it saves its persistence file) or restarted on the same
 * port and folder.
 */
import { ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';

const CANDIDATES = ['/usr/sbin/mosquitto', '/usr/bin/mosquitto', '/usr/local/sbin/mosquitto'];

/** Path of the mosquitto binary, or null if it is not installed (`apt-get install mosquitto`). */
export function mosquittoPath(): string | null {
  return CANDIDATES.find((p) => fs.existsSync(p)) ?? null;
}

/** A TCP port free on 127.0.0.1 right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** Whether something accepts connections on 127.0.0.1:port. */
export function portOpen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ port, host: '127.0.0.1' });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export class Mosquitto {
  private proc: ChildProcess | null = null;
  private log = '';

  private constructor(
    readonly port: number,
    readonly dir: string,
  ) {}

  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  /** What the broker printed (for failure messages). */
  get output(): string {
    return this.log;
  }

  static async start(): Promise<Mosquitto> {
    const bin = mosquittoPath();
    if (!bin) throw new Error('mosquitto is not installed: apt-get install mosquitto (.ci/run does)');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-mosquitto-'));
    const m = new Mosquitto(await freePort(), dir);
    fs.writeFileSync(
      path.join(dir, 'mosquitto.conf'),
      [
        `listener ${m.port} 127.0.0.1`,
        'allow_anonymous true',
        'persistence true',
        `persistence_location ${dir}/`,
        'autosave_interval 1',
        'max_queued_messages 100000',
        'log_dest stdout',
        'log_type error',
        'log_type warning',
        '',
      ].join('\n'),
    );
    await m.run();
    return m;
  }

  private async run(): Promise<void> {
    const proc = spawn(mosquittoPath()!, ['-c', path.join(this.dir, 'mosquitto.conf')], { stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc = proc;
    proc.stdout!.on('data', (d) => (this.log += d));
    proc.stderr!.on('data', (d) => (this.log += d));
    const deadline = Date.now() + 10_000;
    while (!(await portOpen(this.port))) {
      if (proc.exitCode !== null) throw new Error(`mosquitto exited with ${proc.exitCode}: ${this.log}`);
      if (Date.now() > deadline) throw new Error(`mosquitto did not listen on ${this.port} within 10 s: ${this.log}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Stops the broker (SIGTERM: it writes its persistence file first) and waits for it to exit. */
  async stop(): Promise<void> {
    const p = this.proc;
    this.proc = null;
    if (!p || p.exitCode !== null) return;
    await new Promise<void>((resolve) => {
      p.once('exit', () => resolve());
      p.kill('SIGTERM');
      setTimeout(() => p.kill('SIGKILL'), 5000).unref();
    });
  }

  /** Stops and starts it again on the same port with the same persistence. */
  async restart(): Promise<void> {
    await this.stop();
    await this.run();
  }

  /** Stops it and removes its folder. */
  async remove(): Promise<void> {
    await this.stop();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
