/**
 * Log floods (issue 14, item 15): what a peer can make the server log is
 * throttled, and a flood of duplicate-ID newcomers counts against its address.
 */
import test from 'ava';
import * as net from 'node:net';
import * as path from 'node:path';
import { Client, createLogger, LogRecord, Server } from '../src';
import { MeshRootEmulator } from '../src/emulator';
import { Op, rootBody } from '../src/protocol/frames';
import { DataTypeTable } from '../src/telemetry';
import { MeshTransport } from '../src/transports/uart';
import { PtyPair } from './helpers/pty-pair';
import { serve } from './helpers/serve';
import { eventually } from './helpers/wait';

function connectFrom(port: number, localAddress: string, send: string): Promise<void> {
  return new Promise((resolve) => {
    const s = net.connect({ port, host: '127.0.0.1', localAddress }, () => s.write(send));
    s.on('data', () => {});
    s.on('error', () => resolve());
    s.on('close', () => resolve());
    setTimeout(() => s.destroy(), 3000);
  });
}

test('2,000 duplicate-ID newcomers: a few throttled warnings, the address blocked, the connected board untouched', async (t) => {
  const s = await serve(t, {});
  const holder = new Client({ id: 'dup', port: s.port });
  t.teardown(() => holder.close());
  await holder.connect();
  for (let i = 0; i < 2000; i += 50) {
    await Promise.all(Array.from({ length: 50 }, () => connectFrom(s.port, '127.0.0.9', 'dup\n')));
  }
  await eventually(() => /keeps presenting client IDs that are already connected/.test(s.output()), 10_000, 'the address is blocked');
  const warnings = (s.output().match(/duplicate client ID: newcomer closed/g) ?? []).length;
  t.log(`duplicate-ID warnings logged: ${warnings} for 2,000 newcomers`);
  t.true(warnings <= 30, `${warnings} warnings`);
  t.is(holder.counters.outages, 0);
  const other = new Client({ id: 'fresh', port: s.port });
  t.teardown(() => other.close());
  await other.connect(); // from 127.0.0.1, not blocked
  t.true(s.alive());
});

test('serial junk from the mesh root: warnings throttled, counted in full', async (t) => {
  const logs: LogRecord[] = [];
  const pty = await PtyPair.open('flood');
  const server = new Server({ timeout: 600, logger: createLogger({ level: 'info', sink: (r) => logs.push(r) }) });
  const table = DataTypeTable.load(path.join(__dirname, '..', 'examples', 'data-types.json'));
  const mesh = new MeshTransport(server, { path: pty.a, baudRate: 921600, dataTypes: table });
  await mesh.open();
  const emu = await MeshRootEmulator.open({ path: pty.b, baudRate: 921600, timeout: 600, dataTypes: table });
  t.teardown(async () => {
    await emu.close();
    await mesh.close();
    await server.close();
    await pty.close();
  });
  for (let i = 0; i < 400; i++) {
    emu.injectFrame(rootBody(0x0001, 0x77, Buffer.from('??'))); // unknown opcode
    emu.injectFrame(rootBody(0x0001, Op.NODE_UP, Buffer.from([1, 2, 3]))); // malformed body
  }
  await eventually(() => mesh.stats.unknownOpcodes >= 400 && mesh.stats.badBodies >= 400, 20_000, 'every junk frame counted');
  const warned = logs.filter((r) => r.level === 'warn').length;
  t.log(`800 junk frames: ${warned} warnings`);
  t.true(warned <= 30, `${warned} warnings`);
});
