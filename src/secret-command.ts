/**
 * `tether secret`: device secrets for one board or a whole fleet at once.
 *
 *   tether secret lamp-1                              one ID (the original output)
 *   tether secret lamp-1 lamp-2 lamp-3                several IDs
 *   tether secret --ids-from ids.txt                  one ID per line ("-" = stdin; # comments)
 *   tether secret --count 20 --prefix lamp-           lamp-1 … lamp-20 (--start K to begin elsewhere)
 *   … --out boards.txt                                board ID lines (secrets) to a file only you can read;
 *                                                     then stdout carries only the hashes, as JSON
 *
 * Two halves come out: the `auth.devices` object for the server's config (salted
 * hashes, safe in a config file and in logs) and, per board, its ID line
 * `id@secret` (the secret itself: whoever has it can be that board). Secrets go
 * to stdout only when no --out is given, and then a note on stderr says so.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { checkSecret, generateSecret, hashSecret } from './auth';
import { idProblem, normalizeId } from './server';

export const SECRET_USAGE = `usage: tether secret [ID…] [--ids-from FILE] [--count N --prefix P [--start K]]
                     [--out FILE] [--format lines|json|csv] [--force] [--secret S] [--scrypt]

Makes a random secret per client ID and prints the two halves:
  - "auth.devices" for the server's config: ID → salted hash (no secrets; safe to keep and log)
  - per board its ID line, id@secret: the client ID to configure on that board
    ("id" in its local.json, or Client('lamp-1@…', …)). These are secrets.

IDs:
  ID…                 client IDs on the command line
  --ids-from FILE     one ID per line; blank lines and lines starting with # are skipped; - reads stdin
  --count N           N numbered IDs: <prefix><start> … <prefix><start+N-1>
  --prefix P          prefix of the numbered IDs (default "")
  --start K           first number (default 1)
Output:
  --out FILE          write the board ID lines to FILE (created readable by you only; an existing
                      FILE is refused unless --force) and print only the auth.devices JSON on stdout
  --format F          lines (default: one id@secret per line), json ({"id": "id@secret", …}) or
                      csv (id,id_line); default: from --out's extension (.json, .csv), else lines.
                      Without --out, json and csv put both halves on stdout in that form
  --force             overwrite an existing --out FILE
Secrets:
  --secret S          use this secret instead of a random one (one ID only)
  --scrypt            slow scrypt hashes, for secrets people chose (default: sha256 for random ones)

Without --out the secrets are printed on stdout, and a note on stderr says so: a terminal's
scrollback, a CI log or a shared screen keeps what is printed.
`;

/** Most IDs one run makes (the server's default maxDevices). */
const MAX_IDS = 100_000;
/** The server's default maxIdLength: the longest ID line, in bytes. */
const MAX_ID_LINE = 1024;

type Format = 'lines' | 'json' | 'csv';

export interface SecretIo {
  stdout(text: string): void;
  stderr(text: string): void;
  /** Text of FILE, or of stdin for "-". */
  readFile(file: string): string;
}

const processIo: SecretIo = {
  stdout: (t) => process.stdout.write(t),
  stderr: (t) => process.stderr.write(t),
  readFile: (f) => fs.readFileSync(f === '-' ? 0 : f, 'utf8'),
};

class UsageError extends Error {}

/** Runs `tether secret …`; returns the exit code (2 for a usage error, with the reason on stderr). */
export function secretCommand(args: string[], io: SecretIo = processIo): number {
  try {
    return run(args, io);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    io.stderr(`tether secret: ${e.message}\n(tether secret --help shows every option)\n`);
    return 2;
  }
}

const OPTIONS = {
  secret: { type: 'string' },
  scrypt: { type: 'boolean' },
  'ids-from': { type: 'string', multiple: true },
  count: { type: 'string' },
  prefix: { type: 'string' },
  start: { type: 'string' },
  out: { type: 'string' },
  format: { type: 'string' },
  force: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const;

function parse(args: string[]) {
  try {
    return parseArgs({ args, allowPositionals: true, options: OPTIONS });
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

function run(args: string[], io: SecretIo): number {
  const { values: o, positionals } = parse(args);
  if (o.help) {
    io.stdout(SECRET_USAGE);
    return 0;
  }

  const ids = collectIds(positionals, o, io);
  if (o.secret !== undefined && ids.length !== 1) {
    throw new UsageError(`--secret sets the secret of one board; with ${ids.length} IDs leave it out and each gets its own random secret`);
  }
  if (o.secret !== undefined) {
    try {
      checkSecret(o.secret);
    } catch (e) {
      throw new UsageError(`--secret: ${(e as Error).message}`);
    }
  }
  const format = pickFormat(o.format, o.out);
  if (o.force && o.out === undefined) throw new UsageError('--force only applies to --out FILE');

  // The file first: a refused --out must not cost a set of secrets already shown.
  let fd: number | undefined;
  if (o.out !== undefined) fd = openOut(o.out, !!o.force);

  const rows = ids.map((id) => {
    const secret = o.secret ?? generateSecret();
    return { id, line: `${id}@${secret}`, hash: hashSecret(secret, { scrypt: o.scrypt }) };
  });
  const devices: Record<string, string> = {};
  for (const r of rows) devices[r.id] = r.hash;
  const boards = boardText(rows, format);

  if (fd !== undefined) {
    try {
      fs.writeSync(fd, boards);
      fs.fsyncSync(fd);
    } catch (e) {
      fs.closeSync(fd);
      fd = undefined;
      fs.rmSync(o.out!, { force: true }); // half a file of secrets helps nobody
      throw new UsageError(`--out ${o.out}: could not write it (${(e as Error).message}); nothing was kept, run it again`);
    }
    fs.closeSync(fd);
    io.stdout(JSON.stringify(devices, null, 2) + '\n');
    io.stderr(
      `tether secret: wrote ${rows.length} board ID line${rows.length === 1 ? '' : 's'} (secrets, ${format}) to ${o.out}, readable by you only. ` +
        `stdout has the "auth.devices" object for the server's config (hashes only). ` +
        `Put each ID line on its board ("id" in its local.json), then keep ${o.out} somewhere safe or delete it: the server needs only the hashes.\n`,
    );
    return 0;
  }

  // No --out: everything on stdout, and a word on stderr that secrets were printed.
  const single = positionals.length === 1 && ids.length === 1 && o.format === undefined;
  if (single) {
    // The one-ID form, unchanged since the first version.
    const r = rows[0];
    io.stdout(
      `device ID line (the client ID to configure on the board): ${r.line}\n` +
        `config entry (tether.json "auth": { "devices": { … } }):   ${JSON.stringify(r.id)}: ${JSON.stringify(r.hash)}\n`,
    );
  } else if (format === 'json') {
    const map: Record<string, string> = {};
    for (const r of rows) map[r.id] = r.line;
    io.stdout(JSON.stringify({ auth: { devices }, boards: map }, null, 2) + '\n');
  } else if (format === 'csv') {
    io.stdout('id,id_line,hash\n' + rows.map((r) => [r.id, r.line, r.hash].map(csvField).join(',')).join('\n') + '\n');
  } else {
    io.stdout(
      `"auth.devices" for the server's config (hashes, no secrets): paste as the value of "devices" in "auth": { "devices": … }\n` +
        JSON.stringify(devices, null, 2) +
        `\n\nboard ID lines (SECRETS): one per board, as its client ID ("id" in its local.json)\n` +
        boards,
    );
  }
  io.stderr(
    `tether secret: the output above holds ${rows.length === 1 ? 'a secret' : `${rows.length} secrets`} in clear text; ` +
      `a terminal's scrollback, a CI log or a shared screen keeps them. --out FILE writes them to a file only you can read instead.\n`,
  );
  return 0;
}

function collectIds(positionals: string[], o: { 'ids-from'?: string[]; count?: string; prefix?: string; start?: string }, io: SecretIo): string[] {
  const raw: Array<[string, string]> = positionals.map((id) => [id, 'the command line']);
  for (const file of o['ids-from'] ?? []) {
    let text: string;
    try {
      text = io.readFile(file);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new UsageError(
        err.code === 'ENOENT' ? `--ids-from ${file}: no such file (resolved to ${path.resolve(file)}): give a file with one client ID per line` : `--ids-from ${file}: ${err.message}`,
      );
    }
    text.split(/\r?\n/).forEach((l, i) => {
      const id = l.trim();
      if (id && !id.startsWith('#')) raw.push([id, `${file === '-' ? 'stdin' : file} line ${i + 1}`]);
    });
  }
  if (o.count !== undefined) {
    const n = Number(o.count);
    if (!/^\d+$/.test(o.count) || n < 1 || n > MAX_IDS) throw new UsageError(`--count must be a whole number from 1 to ${MAX_IDS}, not "${o.count}"`);
    const start = o.start === undefined ? 1 : Number(o.start);
    if (o.start !== undefined && !/^\d+$/.test(o.start)) throw new UsageError(`--start must be a whole number >= 0, not "${o.start}"`);
    const prefix = o.prefix ?? '';
    for (let i = 0; i < n; i++) raw.push([`${prefix}${start + i}`, '--count']);
  } else if (o.prefix !== undefined || o.start !== undefined) {
    throw new UsageError('--prefix and --start number the IDs of --count N: add --count, e.g. --count 20 --prefix lamp-');
  }
  if (raw.length === 0) {
    throw new UsageError('give the client IDs: tether secret lamp-1 lamp-2, --ids-from FILE (one per line) or --count 20 --prefix lamp-');
  }
  if (raw.length > MAX_IDS) throw new UsageError(`${raw.length} IDs is more than one run makes (${MAX_IDS}): split the list`);
  const seen = new Map<string, string>();
  const ids: string[] = [];
  for (const [given, from] of raw) {
    const id = normalizeId(given);
    const problem = /[@\n]/.test(id)
      ? `it contains "${id.includes('@') ? '@' : '\\n'}", which separates the secret from the ID`
      : id.includes('##')
        ? 'it contains "##", which starts a device type in the ID line'
        : idProblem(id);
    if (problem) throw new UsageError(`bad client ID ${JSON.stringify(given)} (${from}): ${problem}`);
    if (Buffer.byteLength(id) + 1 + 22 > MAX_ID_LINE) {
      throw new UsageError(`client ID ${JSON.stringify(given.slice(0, 40))}… (${from}) is too long: with its secret the ID line must fit ${MAX_ID_LINE} bytes`);
    }
    const before = seen.get(id);
    if (before !== undefined) throw new UsageError(`client ID ${JSON.stringify(id)} is given twice (${before} and ${from}): each board needs its own ID`);
    seen.set(id, from);
    ids.push(id);
  }
  return ids;
}

function pickFormat(format: string | undefined, out: string | undefined): Format {
  if (format !== undefined) {
    if (format !== 'lines' && format !== 'json' && format !== 'csv') throw new UsageError(`--format must be lines, json or csv, not "${format}"`);
    return format;
  }
  const ext = out === undefined ? '' : path.extname(out).toLowerCase();
  return ext === '.json' ? 'json' : ext === '.csv' ? 'csv' : 'lines';
}

/** Opens --out for writing, mode 0600; an existing file only with --force (its secrets would be lost). */
function openOut(file: string, force: boolean): number {
  try {
    if (force && fs.existsSync(file)) {
      fs.chmodSync(file, 0o600); // before the new secrets go in
      return fs.openSync(file, 'w', 0o600);
    }
    return fs.openSync(file, 'wx', 0o600);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    if (err.code === 'EEXIST') {
      throw new UsageError(`--out ${file} already exists: it may hold the secrets of boards already set up. Pick another name, or add --force to overwrite it`);
    }
    if (err.code === 'ENOENT') throw new UsageError(`--out ${file}: its folder ${path.dirname(path.resolve(file))} does not exist: create it first`);
    throw new UsageError(`--out ${file}: ${err.message}`);
  }
}

function boardText(rows: Array<{ id: string; line: string }>, format: Format): string {
  if (format === 'json') {
    const map: Record<string, string> = {};
    for (const r of rows) map[r.id] = r.line;
    return JSON.stringify(map, null, 2) + '\n';
  }
  if (format === 'csv') return 'id,id_line\n' + rows.map((r) => `${csvField(r.id)},${csvField(r.line)}`).join('\n') + '\n';
  return rows.map((r) => r.line).join('\n') + '\n';
}

/** A CSV field, quoted when it has to be (RFC 4180). */
function csvField(s: string): string {
  return /[",\r\n]/.test(s) || /^\s|\s$/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}
