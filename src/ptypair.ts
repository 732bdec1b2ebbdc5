/**
 * A real pseudo-terminal pair made by socat: two device paths joined back to
 * back, so a serial-port program can talk to another without hardware.
 */
import { ChildProcess, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

let counter = 0;
/** socat processes still running, killed if the test process exits without its teardowns. */
const live = new Set<ChildProcess>();
process.once('exit', () => {
  for (const p of live) p.kill('SIGKILL');
});

let setpriv: boolean | undefined;
/** Whether util-linux's setpriv (with --pdeathsig) can start socat. */
function hasSetpriv(): boolean {
  setpriv ??= process.platform === 'linux' && spawnSync('setpriv', ['--pdeathsig', 'keep', 'true']).status === 0;
  return setpriv;
}

export class PtyPair {
  private exited: Promise<void>;

  private constructor(
    readonly a: string,
    readonly b: string,
    private readonly proc: ChildProcess,
    private stderr: () => string,
  ) {
    this.exited = new Promise((resolve) => {
      if (proc.exitCode !== null || proc.signalCode !== null) resolve();
      else proc.once('exit', () => resolve());
    });
  }

  /** Starts socat and resolves once both links exist (bounded wait). */
  static async open(tag = 'pty', at?: string): Promise<PtyPair> {
    // `at`: reuse the same device paths (a root unplugged and plugged in again).
    const base = at ?? path.join(os.tmpdir(), `tether-${tag}-${process.pid}-${Date.now()}-${counter++}`);
    const a = `${base}-a`;
    const b = `${base}-b`;
    let err = '';
    // socat gets a process group of its own: a Ctrl-C in the terminal signals the whole foreground
    // group, and the pair must outlive it until its owner has shut down what uses it (close() ends
    // socat). Out of the group, nothing would end socat if its owner died without cleaning up (a
    // SIGKILL, a closed terminal): where util-linux's setpriv is there, the kernel sends it SIGTERM then.
    const socat = ['socat', '-d', '-d', `pty,raw,echo=0,link=${a}`, `pty,raw,echo=0,link=${b}`];
    const argv = hasSetpriv() ? ['setpriv', '--pdeathsig', 'TERM', ...socat] : socat;
    const proc = spawn(argv[0], argv.slice(1), {
      stdio: ['ignore', 'ignore', 'pipe'],
      detached: true,
    });
    live.add(proc);
    proc.once('exit', () => live.delete(proc));
    proc.stderr!.setEncoding('utf8');
    proc.stderr!.on('data', (d: string) => (err += d));
    const failed = new Promise<Error>((resolve) => {
      proc.once('error', (e: NodeJS.ErrnoException) =>
        resolve(new Error(e.code === 'ENOENT' ? 'socat is not installed (apt-get install socat)' : `cannot start socat: ${e.message}`)),
      );
      // 127: setpriv found no socat to run.
      proc.once('exit', (code) =>
        resolve(new Error(code === 127 ? 'socat is not installed (apt-get install socat)' : `socat exited early (code ${code}): ${err}`)),
      );
    });
    let early: Error | null = null;
    void failed.then((e) => (early = e));
    for (let i = 0; i < 250; i++) {
      if (early) throw early;
      if (fs.existsSync(a) && fs.existsSync(b)) return new PtyPair(a, b, proc, () => err);
      await new Promise((r) => setTimeout(r, 20));
    }
    proc.kill('SIGKILL');
    throw new Error(`socat did not create ${a} and ${b} within 5 s: ${err}`);
  }

  get log(): string {
    return this.stderr();
  }

  /** Stops socat (it removes the links) and waits for it to exit. */
  async close(): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGTERM');
    const t = setTimeout(() => this.proc.kill('SIGKILL'), 2000);
    await this.exited;
    clearTimeout(t);
  }
}
