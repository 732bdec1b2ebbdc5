/**
 * Four devices and the server swap small JSON lists, as in the original's
 * example: each device reports [connects, count, uptime s]; the server app for
 * that device sends back [count, total lines received]. Both sides write with
 * qos, so every line arrives exactly once even across outages.
 *
 * The MicroPython half of this example lives in clients/micropython/examples/.
 */
import { AppContext, DeviceContext, parseJsonLine } from '../src/apps';
import type { Client } from '../src/client';
import type { Connection } from '../src/connection';
import { sleep } from '../src/util';

export const clients = ['1', '2', '3', '4'];

/** Seconds between writes; small enough to watch, large enough to read. */
const PERIOD_MS = 4000;

/** Server half: one instance per client ID. */
export default async function jsonExchange(conn: Connection, ctx: AppContext): Promise<void> {
  let received = 0;
  const reader = (async () => {
    for await (const line of conn) {
      received++;
      // A line the app cannot read is logged and skipped, never allowed to stop the app.
      const data = parseJsonLine<number[]>(line, ctx.log);
      if (!Array.isArray(data)) continue;
      const [connects, count, uptime] = data;
      ctx.log.info('app got', { from: conn.id, connects, count, uptime });
    }
  })();
  for (let count = 0; !ctx.signal.aborted; count++) {
    const data = [count, received];
    const sent = await conn.write(JSON.stringify(data), { signal: ctx.signal }).then(
      () => true,
      () => false, // aborted at shutdown
    );
    if (sent) ctx.log.info('app sent (acked)', { to: conn.id, data });
    await sleep(PERIOD_MS, ctx.signal);
  }
  await reader;
}

/** Device half, run by `tether demo` / `tether sim` on simulated devices. */
export async function device(client: Client, ctx: DeviceContext): Promise<void> {
  const started = Date.now();
  const reader = (async () => {
    for await (const line of client) ctx.log.info('device got', { data: parseJsonLine(line, ctx.log) });
  })();
  for (let count = 0; !ctx.signal.aborted; count++) {
    const uptime = Math.round((Date.now() - started) / 1000);
    await client.write(JSON.stringify([client.connects, count, uptime]), { signal: ctx.signal }).catch(() => {});
    await sleep(PERIOD_MS, ctx.signal);
  }
  await reader;
}
