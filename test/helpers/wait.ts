/**
 * Bounded waits for tests: a condition polled until it holds, or a failure that
 * names what was awaited. Never a fixed sleep standing in for an assertion.
 */
export async function waitFor<T>(what: string, check: () => T | undefined | null | false, ms = 10_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = check();
    if (v !== undefined && v !== null && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * Polls `cond` (sync or async) every `step` ms until it holds; fails after `ms`
 * with a message naming `what`. The one polling loop the tests share.
 */
export async function eventually(cond: () => boolean | Promise<boolean>, ms = 5000, what = 'condition', step = 10): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, step));
  }
}

/** `p`, or a rejection after `limit` ms naming `what` (a bound on a wait, never an assertion). */
export async function within<T>(p: Promise<T>, limit: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const expiry = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${limit} ms waiting for ${what}`)), limit);
  });
  try {
    return await Promise.race([p, expiry]);
  } finally {
    clearTimeout(timer);
  }
}
