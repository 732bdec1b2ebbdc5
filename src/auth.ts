/**
 * Device authentication that unmodified boards can use: the secret travels inside
 * the ID line the board already sends, as `<id>@<secret>` (before any `##type`).
 * The server keeps only salted hashes of the secrets. Failed attempts are counted
 * per source address, and an address that fails too often is refused for a while.
 *
 * Two hash formats:
 * - `sha256$<salt>$<hash>` for machine-generated secrets (what `tether secret`
 *   makes: 128 random bits). Guessing such a secret is hopeless whatever the hash
 *   costs, and a fast hash keeps a reconnection storm of thousands of devices cheap.
 * - `scrypt$<N>$<r>$<p>$<salt>$<hash>` for secrets chosen by people, which can be
 *   guessed: slow on purpose, computed off the event loop.
 * Salt and hash are base64url.
 */
import * as crypto from 'node:crypto';
import { TetherError } from './errors';

/** Characters a secret may use (base64url): no `@`, `#`, `\n` or spaces. */
export const SECRET_PATTERN = /^[A-Za-z0-9_-]{8,128}$/;

export interface AuthOptions {
  /** Client ID → hashed secret (`sha256$…` or `scrypt$…`; make them with `tether secret <id>`). */
  devices: Record<string, string>;
  /**
   * true: every device must authenticate (by secret or by TLS client certificate);
   * IDs without an entry are refused. false: IDs listed in `devices` must
   * authenticate, others may still connect with a plain ID (for migrating a fleet).
   * Default true.
   */
  required?: boolean;
  /** Failed attempts from one source address, within `failureWindow`, that get it blocked. Default 5. */
  maxFailures?: number;
  /** ms over which failures are counted. Default 60000. */
  failureWindow?: number;
  /** ms a blocked address is refused (its connections are closed before they send anything). Default 60000. */
  blockFor?: number;
}

export const AUTH_DEFAULTS = { required: true, maxFailures: 5, failureWindow: 60_000, blockFor: 60_000 } as const;

/** Splits `<id>@<secret>` into its parts; a plain ID has no secret. */
export function splitSecret(idPart: string): { id: string; secret: string | null } {
  const at = idPart.indexOf('@');
  if (at < 0) return { id: idPart, secret: null };
  return { id: idPart.slice(0, at), secret: idPart.slice(at + 1) };
}

/** A new random secret: 128 bits as 22 base64url characters. */
export function generateSecret(): string {
  return crypto.randomBytes(16).toString('base64url');
}

const SCRYPT_DEFAULTS = { N: 16384, r: 8, p: 1 };

/**
 * The stored form of a secret. `scrypt: true` for secrets people choose; the default
 * (sha256) is for generated ones.
 */
export function hashSecret(secret: string, opts: { scrypt?: boolean } = {}): string {
  checkSecret(secret);
  const salt = crypto.randomBytes(16);
  if (opts.scrypt) {
    const { N, r, p } = SCRYPT_DEFAULTS;
    const hash = crypto.scryptSync(secret, salt, 32, { N, r, p, maxmem: 256 * N * r });
    return `scrypt$${N}$${r}$${p}$${salt.toString('base64url')}$${hash.toString('base64url')}`;
  }
  return `sha256$${salt.toString('base64url')}$${sha256(salt, secret).toString('base64url')}`;
}

export function checkSecret(secret: string): void {
  if (!SECRET_PATTERN.test(secret)) {
    throw new TetherError(
      'ERR_BAD_CONFIG',
      'a secret is 8 to 128 characters from A-Z a-z 0-9 _ - (it travels inside the ID line, so no "@", "#" or spaces): use `tether secret <id>` to make one',
    );
  }
}

function sha256(salt: Buffer, secret: string): Buffer {
  return crypto.createHash('sha256').update(salt).update(secret, 'utf8').digest();
}

interface Parsed {
  kind: 'sha256' | 'scrypt';
  salt: Buffer;
  hash: Buffer;
  N?: number;
  r?: number;
  p?: number;
}

/** Why a stored hash cannot be used, or null if it is well formed. */
export function hashProblem(stored: unknown): string | null {
  return typeof stored === 'string' && parseHash(stored) ? null : 'a hash made by `tether secret <id>` ("sha256$salt$hash" or "scrypt$N$r$p$salt$hash")';
}

function parseHash(stored: string): Parsed | null {
  const parts = stored.split('$');
  const b64 = (s: string) => (/^[A-Za-z0-9_-]+$/.test(s) ? Buffer.from(s, 'base64url') : null);
  if (parts[0] === 'sha256' && parts.length === 3) {
    const salt = b64(parts[1]);
    const hash = b64(parts[2]);
    return salt && hash && hash.length === 32 ? { kind: 'sha256', salt, hash } : null;
  }
  if (parts[0] === 'scrypt' && parts.length === 6) {
    const [N, r, p] = parts.slice(1, 4).map(Number);
    const salt = b64(parts[4]);
    const hash = b64(parts[5]);
    const ok = Number.isInteger(N) && N >= 2 && N <= 1 << 20 && (N & (N - 1)) === 0 && Number.isInteger(r) && r >= 1 && r <= 32 && Number.isInteger(p) && p >= 1 && p <= 16;
    return ok && salt && hash && hash.length >= 16 ? { kind: 'scrypt', salt, hash, N, r, p } : null;
  }
  return null;
}

/** Checks `secret` against a stored hash, in constant time; scrypt runs on the thread pool. */
export async function verifySecret(secret: string, stored: string): Promise<boolean> {
  const h = parseHash(stored);
  if (!h || !SECRET_PATTERN.test(secret)) return false;
  if (h.kind === 'sha256') return crypto.timingSafeEqual(sha256(h.salt, secret), h.hash);
  const got = await new Promise<Buffer>((resolve, reject) =>
    crypto.scrypt(secret, h.salt, h.hash.length, { N: h.N!, r: h.r!, p: h.p!, maxmem: 256 * h.N! * h.r! }, (err, key) => (err ? reject(err) : resolve(key))),
  );
  return crypto.timingSafeEqual(got, h.hash);
}

/**
 * Counts failed attempts per source address in a sliding window and blocks an
 * address that reaches `maxFailures`. Memory is bounded: at most `maxTracked`
 * addresses are remembered (the oldest are forgotten first).
 */
export class FailureTracker {
  private readonly failures = new Map<string, number[]>();
  private readonly blocked = new Map<string, number>();

  constructor(
    private readonly maxFailures: number,
    private readonly window: number,
    private readonly blockFor: number,
    private readonly maxTracked = 10_000,
  ) {}

  /** Records a failure; true if the address is now blocked. */
  fail(address: string, now = Date.now()): boolean {
    const list = (this.failures.get(address) ?? []).filter((t) => now - t < this.window);
    list.push(now);
    this.failures.delete(address); // re-insert: Map order = least recently failed first
    this.failures.set(address, list);
    if (this.failures.size > this.maxTracked) this.failures.delete(this.failures.keys().next().value!);
    if (list.length >= this.maxFailures) {
      this.failures.delete(address);
      this.blocked.set(address, now + this.blockFor);
      if (this.blocked.size > this.maxTracked) this.blocked.delete(this.blocked.keys().next().value!);
      return true;
    }
    return false;
  }

  /** ms until `address` may connect again, or 0 if it is not blocked. */
  blockedFor(address: string, now = Date.now()): number {
    const until = this.blocked.get(address);
    if (until === undefined) return 0;
    if (until <= now) {
      this.blocked.delete(address);
      return 0;
    }
    return until - now;
  }

  /** Addresses blocked right now. */
  get blockedCount(): number {
    const now = Date.now();
    let n = 0;
    for (const until of this.blocked.values()) if (until > now) n++;
    return n;
  }
}
