/**
 * Limit hits: every time a limit turns something away it is counted here (and
 * exported as `tether_limit_hits_total{limit}`) and logged, with the log
 * throttled so a flood of junk cannot flood the log as well.
 */
import type { Fields, Logger } from './log';

/** Server-wide limits counted by the Server and its transports. */
export const LIMIT_NAMES = [
  'maxConnections',
  'maxConnectionsPerAddress',
  'idTimeout',
  'maxIdLength',
  'authFailed',
  'addressBlocked',
  'tlsHandshake',
  'maxSendBuffer',
  'httpToken',
  'maxDevices',
  'strikes',
] as const;
export type LimitName = (typeof LIMIT_NAMES)[number];

export type LimitHits = Record<LimitName, number>;

export function zeroHits(): LimitHits {
  return Object.fromEntries(LIMIT_NAMES.map((n) => [n, 0])) as LimitHits;
}

const WINDOW = 10_000;
const PER_WINDOW = 10;

interface Throttle {
  start: number;
  logged: number;
  suppressed: number;
}

/** Per log destination (a logger and its children share one), per message. */
const throttles = new WeakMap<object, Map<string, Throttle>>();

/**
 * Logs a warning at most 10 times per 10 s per `msg` and log destination; the
 * first record after a quiet spell says how many were suppressed meanwhile.
 */
export function throttledWarn(log: Logger, msg: string, fields: Fields = {}, now = Date.now()): void {
  throttled(log, 'warn', msg, fields, now);
}

/** The same at info level: for records a peer can cause at will (one per new client ID…). */
export function throttledInfo(log: Logger, msg: string, fields: Fields = {}, now = Date.now()): void {
  throttled(log, 'info', msg, fields, now);
}

/** The same at error level: for failures that can repeat at a device's pace (a journal on a full disk…). */
export function throttledError(log: Logger, msg: string, fields: Fields = {}, now = Date.now()): void {
  throttled(log, 'error', msg, fields, now);
}

function throttled(log: Logger, level: 'error' | 'warn' | 'info', msg: string, fields: Fields, now: number): void {
  if (log.level === 'silent' || (level !== 'error' && log.level === 'error') || (level === 'info' && log.level === 'warn')) return;
  const key = log.throttleKey ?? log;
  let byMsg = throttles.get(key);
  if (!byMsg) throttles.set(key, (byMsg = new Map()));
  let t = byMsg.get(msg);
  if (!t) {
    t = { start: now, logged: 0, suppressed: 0 };
    byMsg.set(msg, t);
  }
  if (now - t.start >= WINDOW) {
    t.start = now;
    t.logged = 0;
  }
  if (t.logged >= PER_WINDOW) {
    t.suppressed++;
    return;
  }
  t.logged++;
  if (t.suppressed > 0) {
    log[level](msg, { ...fields, suppressed: t.suppressed, note: 'similar records were suppressed (at most 10 per 10 s are logged)' });
    t.suppressed = 0;
  } else {
    log[level](msg, fields);
  }
}
