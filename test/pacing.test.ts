/**
 * An app streaming lines without qos is paced by its device (issue 14, item 3):
 * against a real `tether serve`, the stream never piles up in memory, its device
 * is not dropped as "not reading", and the other devices notice nothing.
 */
import test from 'ava';
import * as path from 'node:path';
import { Client } from '../src';
import { serve } from './helpers/serve';
import { eventually } from './helpers/wait';

test('qos: false writes wait for room: the stream is paced by its device, bystanders keep their links', async (t) => {
  const s = await serve(t, { apps: [{ script: path.join(__dirname, 'fixtures', 'stream-app.ts'), clients: '*' }] });
  const bystanders = Array.from({ length: 20 }, (_, i) => new Client({ id: `by-${i}`, port: s.port }));
  t.teardown(() => bystanders.forEach((b) => b.close()));
  await Promise.all(bystanders.map((b) => b.connect()));
  const stream = new Client({ id: 'stream', port: s.port });
  t.teardown(() => stream.close());
  await stream.connect();
  let got = 0;
  let last = -1;
  let outOfOrder = 0;
  void (async () => {
    for await (const line of stream) {
      const n = Number(line.slice(0, line.indexOf(' ')));
      if (n <= last) outOfOrder++;
      last = n;
      got++;
    }
  })();
  // Bystanders exchange a line a second each while the stream runs for 6 s.
  const stop = Date.now() + 6000;
  await Promise.all(
    bystanders.map(async (b, i) => {
      for (let k = 0; Date.now() < stop; k++) {
        await b.write(`hello ${i} ${k}`);
        t.is(await b.readline(AbortSignal.timeout(10_000)), `hello ${i} ${k}\n`);
        await new Promise((r) => setTimeout(r, 1000));
      }
    }),
  );
  await eventually(() => got > 1000, 10_000, 'the stream flows');
  const metrics: string = await s.api('/metrics');
  const rss = Number(/^process_resident_memory_bytes (\d+)/m.exec(metrics)?.[1]);
  t.log(`stream lines received ${got}, server RSS ${Math.round(rss / 2 ** 20)} MiB`);
  t.true(rss < 400 * 2 ** 20, `server RSS ${Math.round(rss / 2 ** 20)} MiB stays bounded`);
  t.is(outOfOrder, 0);
  t.is(stream.counters.outages, 0, 'the streaming device is not dropped as "not reading"');
  for (const b of bystanders) t.is(b.counters.outages, 0, `${b.id} kept its link`);
  t.notRegex(s.output(), /device not reading: link dropped/);
  t.true(s.alive());
});
