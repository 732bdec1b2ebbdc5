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
