/** Small async helpers shared by the Endpoint, the Server and the Client. */

/** Wakes every waiter when something changed; waiters re-check their condition. */
export class Notifier {
  private waiters: Array<() => void> = [];

  /** Resolves on the next notify(); rejects with `onAbort(reason)` if `signal` aborts first. */
  wait(signal?: AbortSignal, onAbort?: (reason: unknown) => Error): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      if (!signal) {
        this.waiters.push(resolve);
        return;
      }
      if (signal.aborted) {
        reject(onAbort ? onAbort(signal.reason) : signal.reason);
        return;
      }
      const done = () => {
        signal.removeEventListener('abort', aborted);
        resolve();
      };
      const aborted = () => {
        const i = this.waiters.indexOf(done);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(onAbort ? onAbort(signal.reason) : signal.reason);
      };
      signal.addEventListener('abort', aborted, { once: true });
      this.waiters.push(done);
    });
  }

  notify(): void {
    if (this.waiters.length === 0) return;
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
}

export interface Deferred<T> {
  promise: Promise<T>;
  resolve(v: T): void;
  reject(e: unknown): void;
}

export function deferred<T = void>(): Deferred<T> {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** `p`, or a rejection with `onAbort(reason)` as soon as `signal` aborts. */
export function raceAbort<T>(p: Promise<T>, signal: AbortSignal | undefined, onAbort: (reason: unknown) => Error): Promise<T> {
  if (!signal) return p;
  if (signal.aborted) return Promise.reject(onAbort(signal.reason));
  return new Promise<T>((resolve, reject) => {
    const aborted = () => reject(onAbort(signal.reason));
    signal.addEventListener('abort', aborted, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', aborted);
        resolve(v);
      },
      (e) => {
        signal.removeEventListener('abort', aborted);
        reject(e);
      },
    );
  });
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  // Already aborted: its 'abort' event has fired and will not fire again.
  if (signal?.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      signal?.removeEventListener('abort', done);
      clearTimeout(t);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });
}

/** A printable, bounded preview of raw bytes for log records. */
export function preview(buf: Buffer, max = 40): string {
  const s = JSON.stringify(buf.subarray(0, max).toString('latin1'));
  return buf.length > max ? `${s}… (${buf.length} bytes)` : s;
}

/**
 * mulberry32: a tiny seeded PRNG (uniform in [0, 1)), so a run driven by it can be
 * replayed from its seed. Not for anything secret.
 */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

/** A value as a config error shows it: JSON, except what JSON cannot say (1e400 is Infinity, not null). */
export function shown(v: unknown): string {
  if (typeof v === 'number' && !Number.isFinite(v)) return String(v);
  if (v === undefined) return 'nothing';
  return JSON.stringify(v) ?? String(v);
}
