/**
 * Mesh sensor nodes behind a UART mesh root: each node reports a reading line
 * every few seconds, and its root also sends DATA frames (temperature,
 * humidity…) that tether decodes into the node's telemetry. The app logs both
 * and answers each reading, with qos, exactly as it would a WiFi node.
 *
 * `tether demo` runs these IDs on the mesh emulator over a pty pair when socat
 * is installed, and as plain TCP devices otherwise.
 */
import { AppContext, DeviceContext, parseJsonLine } from '../src/apps';
import type { Client } from '../src/client';
import type { Connection } from '../src/connection';
import { sleep } from '../src/util';

export const clients = ['mesh-1', 'mesh-2', 'mesh-3'];

const PERIOD_MS = 5000;

/** Server half. */
export default async function meshSensors(conn: Connection, ctx: AppContext): Promise<void> {
  conn.on('telemetry', (name: string, value: unknown) => ctx.log.info('telemetry', { from: conn.id, name, value }));
  for await (const line of conn) {
    const reading = parseJsonLine<{ reading?: unknown }>(line, ctx.log)?.reading;
    if (typeof reading !== 'number') continue; // not a reading: logged, skipped
    ctx.log.info('reading', { from: conn.id, via: conn.remote, reading });
    await conn.write(JSON.stringify({ thanks: reading }), { signal: ctx.signal }).catch(() => {});
  }
}

/** Device half. */
export async function device(client: Client, ctx: DeviceContext): Promise<void> {
  const reader = (async () => {
    for await (const line of client) ctx.log.info('node got', { data: parseJsonLine(line, ctx.log) });
  })();
  for (let n = 0; !ctx.signal.aborted; n++) {
    await client.write(JSON.stringify({ reading: n }), { signal: ctx.signal }).catch(() => {});
    await sleep(PERIOD_MS, ctx.signal);
  }
  await reader;
}
