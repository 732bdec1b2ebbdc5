/**
 * `tether secret` for a fleet (issue 16 item 4): the real CLI (`node bin/tether.js secret …`)
 * makes the secrets, the hashes it prints verify with verifySecret, and a real `tether serve`
 * configured with them lets a Node client in with each secret and no other.
 */
import test, { ExecutionContext } from 'ava';
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Client, silentLogger } from '../src';
import { verifySecret } from '../src/auth';
import { secretCommand } from '../src/secret-command';
import { serve } from './helpers/serve';
import { eventually } from './helpers/wait';

const ROOT = path.join(__dirname, '..');
const BIN = path.join(ROOT, 'bin', 'tether.js');
/** Run the sources (the CLI under test), not a possibly older build. */
const ENV = { ...process.env, TETHER_SOURCE: '1' };

interface Run {
  code: number | null;
  out: string;
  err: string;
}

function secret(args: string[], opts: { cwd?: string; input?: string } = {}): Promise<Run> {
  return new Promise((resolve) => {
    const child = execFile(process.execPath, [BIN, 'secret', ...args], { cwd: opts.cwd ?? ROOT, env: ENV, timeout: 60_000 }, (e, out, err) =>
      resolve({ code: e ? ((e as { code?: number }).code ?? null) : 0, out, err }),
    );
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    else child.stdin!.end();
  });
}

/** The command in this process, with its output captured. */
function inProcess(args: string[]): Run {
  let out = '';
  let err = '';
  const code = secretCommand(args, { stdout: (x) => (out += x), stderr: (x) => (err += x), readFile: (f) => fs.readFileSync(f, 'utf8') });
  return { code, out, err };
}

function tmpDir(t: ExecutionContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-secret-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** `id@secret` → [id, secret]. */
function split(line: string): [string, string] {
  const at = line.indexOf('@');
  return [line.slice(0, at), line.slice(at + 1)];
}

async function checkPairs(t: ExecutionContext, devices: Record<string, string>, lines: string[]): Promise<void> {
  t.deepEqual(Object.keys(devices).sort(), lines.map((l) => split(l)[0]).sort(), 'one hash per board');
  for (const line of lines) {
    const [id, s] = split(line);
    t.regex(s, /^[A-Za-z0-9_-]{22}$/, '128 random bits, base64url');
    t.true(await verifySecret(s, devices[id]), `${id}: its secret verifies against its hash`);
  }
  // And no secret verifies against another board's hash.
  const [a, b] = lines.map(split);
  if (b) t.false(await verifySecret(a[1], devices[b[0]]));
  t.is(new Set(lines.map((l) => split(l)[1])).size, lines.length, 'every secret is different');
}

test('many IDs with --out: hashes as JSON on stdout, ID lines in a private file; a real server lets each board in with its secret only', async (t) => {
  const dir = tmpDir(t);
  const out = path.join(dir, 'boards.txt');
  const ids = ['lamp-1', 'lamp-2', 'lamp-3', 'hall-sensor'];
  const r = await secret([...ids, '--out', out]);
  t.is(r.code, 0, r.err);
  const devices = JSON.parse(r.out) as Record<string, string>; // stdout is pure JSON: pipe it or paste it
  t.deepEqual(Object.keys(devices), ids);
  t.false(fs.readFileSync(out, 'utf8').split('\n').some((l) => r.out.includes(split(l)[1] || '\u0000')), 'no secret on stdout');
  t.is(fs.statSync(out).mode & 0o777, 0o600, 'readable by its owner only');
  t.regex(r.err, /wrote 4 board ID lines \(secrets, lines\) to .*boards\.txt, readable by you only/);
  const lines = fs.readFileSync(out, 'utf8').trimEnd().split('\n');
  t.deepEqual(lines.map((l) => split(l)[0]), ids);
  await checkPairs(t, devices, lines);

  // The server, configured with exactly that object, and a Node client per board.
  const s = await serve(t, { auth: { devices, maxFailures: 100 } }, { TETHER_SOURCE: '1' });
  for (const line of lines) {
    const [id, sec] = split(line);
    const c = new Client({ id, secret: sec, host: '127.0.0.1', port: s.port, timeout: 2000, logger: silentLogger });
    t.teardown(() => c.close());
    await c.connect();
    await c.write(`hello from ${id}`);
  }
  await eventually(async () => (await s.api('/api/devices?status=up')).devices.length === ids.length, 20_000, 'all four up');
  // lamp-1 with lamp-2's secret: refused, counted as an auth failure.
  const wrong = new Client({ id: 'lamp-1', secret: split(lines[1])[1], host: '127.0.0.1', port: s.port, timeout: 2000, logger: silentLogger });
  t.teardown(() => wrong.close());
  void wrong.connect().catch(() => {}); // never comes up: the server closes each attempt
  await eventually(() => /wrong secret/.test(s.output()), 20_000, 'the refusal logged');
  t.is(wrong.connects, 0);
  for (const line of lines) t.false(s.output().includes(split(line)[1]), 'secrets never reach the server log');
});

test('--count/--prefix/--start, --ids-from a file and stdin; json and csv files picked by extension', async (t) => {
  const dir = tmpDir(t);
  const list = path.join(dir, 'ids.txt');
  fs.writeFileSync(list, '# kitchen\nlamp-k1\n\n  lamp-k2  \r\n# hall\nhall-1\n');

  const json = path.join(dir, 'fleet.json');
  const a = await secret(['--count', '3', '--prefix', 'lamp-', '--start', '7', '--ids-from', list, '--out', json]);
  t.is(a.code, 0, a.err);
  const devices = JSON.parse(a.out) as Record<string, string>;
  t.deepEqual(Object.keys(devices), ['lamp-k1', 'lamp-k2', 'hall-1', 'lamp-7', 'lamp-8', 'lamp-9']);
  const boards = JSON.parse(fs.readFileSync(json, 'utf8')) as Record<string, string>;
  t.deepEqual(Object.keys(boards), Object.keys(devices));
  for (const [id, line] of Object.entries(boards)) t.true(line.startsWith(`${id}@`));
  await checkPairs(t, devices, Object.values(boards));

  const csv = path.join(dir, 'fleet.csv');
  const b = await secret(['--ids-from', '-', '--out', csv], { input: 'a-1\na-2\n' });
  t.is(b.code, 0, b.err);
  const rows = fs.readFileSync(csv, 'utf8').trimEnd().split('\n');
  t.is(rows[0], 'id,id_line');
  t.deepEqual(rows.slice(1).map((r) => r.split(',')[0]), ['a-1', 'a-2']);
  await checkPairs(t, JSON.parse(b.out), rows.slice(1).map((r) => r.split(',')[1]));
});

test('without --out: both halves on stdout, ready to paste, and stderr says secrets were printed', async (t) => {
  const r = await secret(['lamp-1', 'lamp-2']);
  t.is(r.code, 0, r.err);
  const [head, rest] = r.out.split('\n\nboard ID lines (SECRETS)');
  t.regex(head, /^"auth\.devices" for the server's config \(hashes, no secrets\)/);
  const devices = JSON.parse(head.slice(head.indexOf('\n') + 1)) as Record<string, string>;
  const lines = rest.split('\n').slice(1).filter(Boolean);
  t.is(lines.length, 2);
  await checkPairs(t, devices, lines);
  t.regex(r.err, /holds 2 secrets in clear text.*--out FILE writes them to a file only you can read instead/);

  // json and csv on stdout: both halves, for scripts (in-process: the same function the CLI runs).
  const j = inProcess(['x-1', 'x-2', '--format', 'json']);
  t.is(j.code, 0);
  t.regex(j.err, /holds 2 secrets in clear text/);
  const both = JSON.parse(j.out) as { auth: { devices: Record<string, string> }; boards: Record<string, string> };
  await checkPairs(t, both.auth.devices, Object.values(both.boards));
  const c = inProcess(['x-1', 'x-2', '--format', 'csv']);
  const rows = c.out.trimEnd().split('\n');
  t.is(rows[0], 'id,id_line,hash');
  for (const row of rows.slice(1)) {
    const [, line, hash] = row.split(',');
    t.true(await verifySecret(split(line)[1], hash));
  }

  // One ID: the original two-line form (plus the note on stderr).
  const one = await secret(['lamp-9']);
  t.is(one.code, 0);
  const m = /^device ID line \(the client ID to configure on the board\): (lamp-9@\S+)\nconfig entry \(tether\.json "auth": \{ "devices": \{ … \} \}\):\s+"lamp-9": ("[^"]+")\n$/.exec(one.out);
  t.truthy(m, one.out);
  t.true(await verifySecret(split(m![1])[1], JSON.parse(m![2])));
  t.regex(one.err, /holds a secret in clear text/);
});

test('--secret for one chosen secret, --scrypt for slow hashes, in bulk too', async (t) => {
  const chosen = await secret(['lamp-1', '--secret', 'kitchen-lamp-secret-1', '--scrypt', '--format', 'json']);
  t.is(chosen.code, 0, chosen.err);
  const one = JSON.parse(chosen.out) as { auth: { devices: Record<string, string> }; boards: Record<string, string> };
  t.is(one.boards['lamp-1'], 'lamp-1@kitchen-lamp-secret-1');
  t.regex(one.auth.devices['lamp-1'], /^scrypt\$/);
  t.true(await verifySecret('kitchen-lamp-secret-1', one.auth.devices['lamp-1']));
  const bulk = await secret(['--count', '3', '--prefix', 's-', '--scrypt', '--format', 'json']);
  const many = JSON.parse(bulk.out) as { auth: { devices: Record<string, string> }; boards: Record<string, string> };
  for (const h of Object.values(many.auth.devices)) t.regex(h, /^scrypt\$/);
  await checkPairs(t, many.auth.devices, Object.values(many.boards));
});

test('mistakes are refused with exit 2 and a message that says what to do; an existing --out file is never overwritten by accident', async (t) => {
  const dir = tmpDir(t);
  const kept = path.join(dir, 'boards.txt');
  fs.writeFileSync(kept, 'old-1@the-secret-of-a-board-in-the-field\n');
  const cases: Array<[string[], RegExp]> = [
    [[], /give the client IDs: tether secret lamp-1 lamp-2, --ids-from FILE \(one per line\) or --count 20 --prefix lamp-/],
    [['lamp-1', 'lamp-2', 'lamp-1'], /client ID "lamp-1" is given twice \(the command line and the command line\): each board needs its own ID/],
    [['lamp@1'], /bad client ID "lamp@1" \(the command line\): it contains "@", which separates the secret from the ID/],
    [['lamp##light'], /it contains "##", which starts a device type/],
    [['lamp\u202e1'], /U\+202E, a control or invisible character/],
    [['a', 'b', '--secret', 'chosen-secret-123'], /--secret sets the secret of one board; with 2 IDs leave it out/],
    [['a', '--secret', 'no'], /--secret: a secret is 8 to 128 characters/],
    [['--count', '0'], /--count must be a whole number from 1 to 100000, not "0"/],
    [['--count', 'ten'], /--count must be a whole number/],
    [['--prefix', 'lamp-'], /--prefix and --start number the IDs of --count N: add --count/],
    [['--ids-from', path.join(dir, 'none.txt')], /--ids-from .*none\.txt: no such file .*one client ID per line/],
    [['a', '--format', 'yaml'], /--format must be lines, json or csv, not "yaml"/],
    [['a', '--force'], /--force only applies to --out FILE/],
    [['a', '--out', path.join(dir, 'no', 'such', 'dir.txt')], /its folder .* does not exist: create it first/],
    [['a', '--out', kept], /boards\.txt already exists: it may hold the secrets of boards already set up\. Pick another name, or add --force/],
    [['--bogus'], /Unknown option '--bogus'/],
  ];
  // Each case in-process (the same function the CLI calls; a process each would take minutes here)…
  for (const [args, want] of cases) {
    const { code, out, err } = inProcess(args);
    t.is(code, 2, args.join(' '));
    t.regex(err, want, args.join(' '));
    t.is(out, '', `${args.join(' ')}: nothing on stdout`);
  }
  // …and three through the real CLI: exit code 2, the message on stderr, nothing on stdout.
  for (const i of [1, 6, 14]) {
    const [args, want] = cases[i];
    const r = await secret(args);
    t.is(r.code, 2, args.join(' '));
    t.regex(r.err, want, args.join(' '));
    t.is(r.out, '');
  }
  t.is(fs.readFileSync(kept, 'utf8'), 'old-1@the-secret-of-a-board-in-the-field\n', 'the old secrets are still there');
  const forced = await secret(['new-1', '--out', kept, '--force']);
  t.is(forced.code, 0, forced.err);
  t.regex(fs.readFileSync(kept, 'utf8'), /^new-1@/);
  t.is(fs.statSync(kept).mode & 0o777, 0o600);
  const help = await secret(['--help']);
  t.is(help.code, 0);
  t.regex(help.out, /--ids-from FILE/);
});
