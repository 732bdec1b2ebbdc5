/**
 * The systemd unit (issue 16 item 3): deploy/tether.service is what `serviceUnit()`
 * makes for a global npm install, `tether service` makes one for the tether that
 * runs it, and both pass `systemd-analyze verify`. This sandbox has systemd's tools
 * but no systemd running as PID 1, so the unit is checked, not started.
 */
import test from 'ava';
import { execFile, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { serviceUnit } from '../src/service';

const ROOT = path.join(__dirname, '..');
const BIN = path.join(ROOT, 'bin', 'tether.js');
const hasAnalyze = !spawnSync('systemd-analyze', ['--version']).error;

function cli(args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { cwd: ROOT, timeout: 60_000 }, (e, out, err) =>
      resolve({ code: e ? ((e as { code?: number }).code ?? null) : 0, out, err }),
    );
  });
}

/** systemd-analyze verify on a unit text (written as tether.service in a fresh folder). */
function verify(unit: string): { status: number | null; output: string } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-unit-'));
  try {
    const file = path.join(dir, 'tether.service');
    fs.writeFileSync(file, unit);
    const r = spawnSync('systemd-analyze', ['verify', file], { encoding: 'utf8' });
    return { status: r.status, output: `${r.stdout}${r.stderr}` };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

test('deploy/tether.service is the unit serviceUnit() makes for a global install', (t) => {
  const file = fs.readFileSync(path.join(ROOT, 'deploy', 'tether.service'), 'utf8');
  t.is(file, serviceUnit(), 'regenerate it: node -r ts-node/register -e "process.stdout.write(require(\'./src/service\').serviceUnit())" > deploy/tether.service');
  for (const line of [
    'User=tether',
    'WorkingDirectory=/var/lib/tether',
    'StateDirectory=tether',
    'ExecStart=/usr/bin/env tether serve --config /var/lib/tether/tether.json',
    'Restart=on-failure',
    'StandardOutput=journal',
    'ProtectSystem=strict',
    'NoNewPrivileges=yes',
  ]) {
    t.true(file.split('\n').includes(line), `has ${line}`);
  }
  // Options that would break tether are absent: Node's JIT, and serial ports for a mesh root.
  t.notRegex(file, /^(MemoryDenyWriteExecute|PrivateDevices|ProtectClock|DevicePolicy|DeviceAllow)=/m);
});

const verified = hasAnalyze ? test : test.skip;
if (!hasAnalyze) test('systemd-analyze is not installed (apt-get install systemd): the units are not verified here', (t) => t.pass());

verified('systemd-analyze verify accepts deploy/tether.service', (t) => {
  const r = verify(fs.readFileSync(path.join(ROOT, 'deploy', 'tether.service'), 'utf8'));
  t.is(r.status, 0, r.output);
  t.is(r.output.trim(), '', 'no warnings either');
});

verified('tether service prints a unit for this installation that systemd-analyze verify accepts', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-svc-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const r = await cli(['service', '--dir', dir, '--user', 'pi']);
  t.is(r.code, 0, r.err);
  t.true(r.out.includes(`ExecStart=${process.execPath} ${fs.realpathSync(BIN)} serve --config ${path.join(dir, 'tether.json')}`), r.out);
  t.regex(r.out, /^User=pi$/m);
  t.regex(r.out, new RegExp(`^ReadWritePaths=${dir}$`, 'm'), 'a folder outside /var/lib is made writable by name');
  const v = verify(r.out);
  t.is(v.status, 0, v.output);
  const bad = await cli(['service', '--dir', 'relative/dir']);
  t.is(bad.code, 1);
  t.regex(bad.err, /--dir must be an absolute path/);
});

test('serviceUnit: node from a home folder (nvm) keeps /home readable instead of hiding it', (t) => {
  const unit = serviceUnit({ exec: ['/home/pi/.nvm/versions/node/v20.19.0/bin/node', '/home/pi/.nvm/versions/node/v20.19.0/bin/tether'] });
  t.regex(unit, /^ProtectHome=read-only$/m);
  t.regex(serviceUnit(), /^ProtectHome=yes$/m);
});
