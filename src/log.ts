/**
 * One structured logger for the whole project. A record is a flat object:
 * `{ time, level, msg, ...fields }`. Output goes to a sink: JSON lines, a
 * human-readable line, or a function (tests collect records this way).
 */
export type Level = 'debug' | 'info' | 'warn' | 'error' | 'silent';
export type Fields = Record<string, unknown>;
export interface LogRecord extends Fields {
  time: number;
  level: Exclude<Level, 'silent'>;
  msg: string;
}

export interface Logger {
  debug(msg: string, fields?: Fields): void;
  info(msg: string, fields?: Fields): void;
  warn(msg: string, fields?: Fields): void;
  error(msg: string, fields?: Fields): void;
  /** A logger that adds `fields` to every record. */
  child(fields: Fields): Logger;
  readonly level: Level;
  /** Shared by a logger and its children (their sink): what throttled warnings are counted against. */
  readonly throttleKey?: object;
}

const RANK: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 99 };

export interface LoggerOptions {
  /** Lowest level written. Default `info`. */
  level?: Level;
  /** `pretty` (default when stderr is a terminal) or `json`; ignored with `sink`. */
  format?: 'pretty' | 'json';
  /** Receives every record instead of stderr. */
  sink?: (rec: LogRecord) => void;
  stream?: NodeJS.WritableStream;
}

/**
 * Characters JSON.stringify leaves as they are but a terminal acts on: C1
 * controls, invisible and direction-changing marks. Text from devices (IDs,
 * lines) must never steer the terminal an operator reads logs in.
 */
const UNSAFE_CHARS = '\\u007f-\\u009f\\u00ad\\u061c\\u200b-\\u200f\\u2028-\\u202e\\u2060-\\u2069\\ufeff';
const UNSAFE = new RegExp(`[${UNSAFE_CHARS}]`, 'g');
/** Whether a string needs quoting: whitespace, quotes, `=`, backslashes, any control or unsafe character (no /g: test() keeps no state). */
const QUOTE = new RegExp(`[\\s"=\\\\\\u0000-\\u001f${UNSAFE_CHARS}]`);

/** `JSON.stringify` with those characters escaped too (still valid JSON). */
export function safeJson(v: unknown, replacer?: (k: string, v: unknown) => unknown): string {
  const s = JSON.stringify(v, replacer as never);
  return s === undefined ? String(v) : s.replace(UNSAFE, (c) => '\\u' + c.charCodeAt(0).toString(16).padStart(4, '0'));
}

function prettyValue(v: unknown): string {
  // Quoted (and escaped) whenever it holds anything but plain printable text.
  if (typeof v === 'string') return QUOTE.test(v) || v === '' ? safeJson(v) : v;
  if (v instanceof Error) return safeJson(v.message);
  return safeJson(v);
}

export function formatPretty(rec: LogRecord): string {
  const { time, level, msg, ...rest } = rec;
  const t = new Date(time).toISOString().slice(11, 23);
  const kv = Object.entries(rest)
    .filter(([, v]) => v !== undefined) // a field with no value is left out, as JSON leaves it out
    .map(([k, v]) => `${k}=${prettyValue(v)}`)
    .join(' ');
  // eslint-disable-next-line no-control-regex -- control characters are exactly what this removes
  return `${t} ${level.toUpperCase().padEnd(5)} ${msg.replace(UNSAFE, '?').replace(/[\u0000-\u001f]/g, '?')}${kv ? ' ' + kv : ''}`;
}

export function createLogger(opts: LoggerOptions = {}): Logger {
  const level = opts.level ?? 'info';
  const stream = opts.stream ?? process.stderr;
  const format = opts.format ?? ((stream as { isTTY?: boolean }).isTTY ? 'pretty' : 'json');
  const sink =
    opts.sink ??
    ((rec: LogRecord) => {
      stream.write((format === 'json' ? safeJson(rec, errorReplacer) : formatPretty(rec)) + '\n');
    });
  return make(level, sink, {});
}

function errorReplacer(_k: string, v: unknown): unknown {
  return v instanceof Error ? v.message : v;
}

function make(level: Level, sink: (rec: LogRecord) => void, bound: Fields): Logger {
  const min = RANK[level];
  const emit = (lvl: Exclude<Level, 'silent'>, msg: string, fields?: Fields) => {
    if (RANK[lvl] < min) return;
    sink({ time: Date.now(), level: lvl, msg, ...bound, ...fields });
  };
  return {
    level,
    throttleKey: sink,
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    child: (fields) => make(level, sink, { ...bound, ...fields }),
  };
}

/** A logger that drops everything. */
export const silentLogger: Logger = createLogger({ level: 'silent', sink: () => {} });
