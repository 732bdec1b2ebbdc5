/**
 * Held bytes are bounded per device and in total (issue 14, item 8): made-up IDs
 * that each dump 64 lines of 60 KB on a real `tether serve` whose app does not
 * read them, then leave, cannot grow the server's memory without bound.
 */
import test from 'ava';
import * as net from 'node:net';
import * as path from 'node:path';
import { Client } from '../src';
import { serve } from './helpers/serve';
import { eventually } from './helpers/wait';

test('ID cycling with big lines: memory stays bounded, a bystander keeps its link', async (t) => {
  const s = await serve(t, {
    apps: [{ script: path.join(__dirname, 'fixtures', 'record-app.ts'), clients: '*' }], // holds its devices without reading
    maxBufferedBytes: 32 * 1024 * 1024,
    maxDevices: 1000,
  });
  const bystander = new Client({ id: 'bystander', port: s.port });
  t.teardown(() => bystander.close());
  await bystander.connect();
  const big = 'z'.repeat(60_000);
  const IDS = 150;
  for (let i = 0; i < IDS; i += 10) {
    await Promise.all(
      Array.from({ length: 10 }, (_, k) =>
        new Promise<void>((resolve) => {
          const sock = net.connect({ port: s.port, host: '127.0.0.1' }, () => {
            let out = `made-up-${i + k}\n`;
            for (let n = 0; n < 64; n++) out += `${(n + 1).toString(16).padStart(2, '0')}${big}\n`;
            sock.write(out);
            setTimeout(() => sock.destroy(), 300); // and leaves
          });
          sock.on('error', () => resolve());
          sock.on('close', () => resolve());
          sock.resume();
        }),
      ),
    );
  }
  const metrics: string = await s.api('/metrics');
  const rss = Number(/^process_resident_memory_bytes (\d+)/m.exec(metrics)?.[1]);
  const heap = Number(/^nodejs_heap_size_used_bytes (\d+)/m.exec(metrics)?.[1]);
  t.log(`${IDS} IDs × 64 × 60 KB sent (${Math.round((IDS * 64 * 60_000) / 2 ** 20)} MiB): server RSS ${Math.round(rss / 2 ** 20)} MiB, heap used ${Math.round(heap / 2 ** 20)} MiB`);
  t.true(heap < 200 * 2 ** 20, `heap ${Math.round(heap / 2 ** 20)} MiB stays bounded (32 MiB of lines allowed)`);
  await bystander.write('still here');
  t.is(bystander.counters.outages, 0);
  await eventually(async () => (await s.api('/api/devices/made-up-0')).device?.buffered > 0, 5000, 'the first IDs kept what fit');
  t.true(s.alive());
});
