/**
 * Remote control through the server: device "tx" has a button, device "rx" an
 * LED. Each button press goes to the server, whose app relays it to rx as an
 * LED command; rx answers with the LED's new state, which the app reports.
 *
 * The MicroPython halves live in clients/micropython/examples/.
 */
import { AppContext, DeviceContext, parseJsonLine } from '../src/apps';
import type { Client } from '../src/client';
import type { Connection } from '../src/connection';
import { sleep } from '../src/util';

export const clients = ['tx', 'rx'];

/** Server half. The tx instance relays presses; the rx instance reports LED states. */
export default async function remoteControl(conn: Connection, ctx: AppContext): Promise<void> {
  if (conn.id === 'tx') {
    const rx = await ctx.clientConn('rx');
    for await (const line of conn) {
      const button = parseJsonLine<{ button?: unknown }>(line, ctx.log)?.button;
      if (button !== 'down' && button !== 'up') continue; // not a button press: logged, skipped
      ctx.log.info('button', { button, relay: 'rx' });
      await rx.write(JSON.stringify({ led: button === 'down' ? 'on' : 'off' }), { signal: ctx.signal });
    }
  } else {
    for await (const line of conn) ctx.log.info('rx reports', { state: parseJsonLine(line, ctx.log) });
  }
}

/** Device half: tx presses its button now and then; rx drives its LED. */
export async function device(client: Client, ctx: DeviceContext): Promise<void> {
  if (client.id === 'tx') {
    while (!ctx.signal.aborted) {
      await sleep(2500 + Math.random() * 2500, ctx.signal);
      await client.write(JSON.stringify({ button: 'down' }), { signal: ctx.signal }).catch(() => {});
      await sleep(400, ctx.signal);
      await client.write(JSON.stringify({ button: 'up' }), { signal: ctx.signal }).catch(() => {});
    }
    return;
  }
  for await (const line of client) {
    const led = parseJsonLine<{ led?: unknown }>(line, ctx.log)?.led;
    if (led !== 'on' && led !== 'off') continue;
    ctx.log.info(`LED ${led}`);
    await client.write(JSON.stringify({ led }), { signal: ctx.signal }).catch(() => {});
  }
}
