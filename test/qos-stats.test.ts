/**
 * qos/stats.ts: the receiver's statistics of the qos demo (duplicates, missing,
 * out of order, peer restarts), fed by hand.
 */
import test from 'ava';
import { encodeQos, MAX_TRACKED_GAP, parseQos, PeerStats, QosStats, renderTable } from '../qos/stats';
import { prng } from './helpers/prng';

function feed(s: PeerStats, ns: number[], boot = 'b1'): string[] {
  return ns.map((n) => s.take({ n, boot }));
}

test('in order from 0: everything received, nothing else counted', (t) => {
  const s = new PeerStats();
  t.deepEqual(feed(s, [0, 1, 2, 3]), ['first', 'new', 'new', 'new']);
  t.like(s, { received: 4, duplicates: 0, outOfOrder: 0, restarts: 0, invalid: 0, last: 3, boot: 'b1' });
  t.is(s.missing, 0);
  t.is(s.unique, 4);
});

test('a repeated number is a duplicate, however late', (t) => {
  const s = new PeerStats();
  t.deepEqual(feed(s, [0, 1, 1, 2, 0, 2]), ['first', 'new', 'duplicate', 'new', 'duplicate', 'duplicate']);
  t.is(s.duplicates, 3);
  t.is(s.received, 6);
  t.is(s.unique, 3);
  t.is(s.missing, 0);
});

test('a skipped number is missing until it arrives; then it counts as out of order', (t) => {
  const s = new PeerStats();
  t.deepEqual(feed(s, [0, 1, 4]), ['first', 'new', 'skip']);
  t.is(s.missing, 2);
  t.is(s.take({ n: 3, boot: 'b1' }), 'late');
  t.is(s.missing, 1);
  t.is(s.outOfOrder, 1);
  t.is(s.take({ n: 3, boot: 'b1' }), 'duplicate', 'a filled gap is not filled twice');
  t.is(s.take({ n: 2, boot: 'b1' }), 'late');
  t.is(s.missing, 0);
  t.is(s.outOfOrder, 2);
  t.is(s.duplicates, 1);
});

test('the first message seen starts the count where it is (the receiver may have joined late)', (t) => {
  const s = new PeerStats();
  t.deepEqual(feed(s, [57, 58]), ['first', 'new']);
  t.is(s.missing, 0);
  t.is(s.take({ n: 12, boot: 'b1' }), 'duplicate', 'below the first seen: not a gap it knows of');
});

test('a new boot is a restart: counting starts again from 0, old gaps stay missing', (t) => {
  const s = new PeerStats();
  feed(s, [0, 1, 3, 4]); // 2 missing
  t.is(s.missing, 1);
  t.is(s.take({ n: 0, boot: 'b2' }), 'restart');
  t.is(s.restarts, 1);
  t.is(s.boot, 'b2');
  t.is(s.missing, 1, 'the old run left 2 unfilled');
  t.is(s.take({ n: 2, boot: 'b2' }), 'skip');
  t.is(s.missing, 2, '1 of the new run is missing too');
  t.is(s.take({ n: 1, boot: 'b2' }), 'late');
  t.is(s.take({ n: 2, boot: 'b2' }), 'duplicate', 'n 2 of the new run, seen');
  t.is(s.missing, 1);
});

test('a restart that does not begin at 0 (its first messages lost) leaves those missing', (t) => {
  const s = new PeerStats();
  feed(s, [0, 1, 2]);
  t.is(s.take({ n: 3, boot: 'b2' }), 'restart');
  t.is(s.missing, 3);
});

test('without boot, n going back to 0 is a restart', (t) => {
  const s = new PeerStats();
  t.deepEqual(
    [0, 1, 2, 0, 0, 1].map((n) => s.take({ n })),
    ['first', 'new', 'new', 'restart', 'duplicate', 'new'],
    'a 0 repeated right after the restart is a duplicate',
  );
  t.is(s.restarts, 1);
  t.is(s.duplicates, 1);
});

test('unreadable lines are counted as invalid and change nothing else', (t) => {
  const s = new PeerStats();
  for (const line of ['', 'hello', '[1]', 'null', '{"n":-1}', '{"n":1.5}', '{"n":"3"}', '{"n":1,"boot":7}', '{"boot":"x"}']) {
    t.is(s.takeLine(line), 'invalid', line);
  }
  t.is(s.invalid, 9);
  t.is(s.received, 0);
  t.is(s.takeLine('{"n": 0, "boot": "ab"}'), 'first', 'the MicroPython json.dumps spacing');
  t.is(s.takeLine(encodeQos(1, 'ab')), 'new');
});

test('encodeQos / parseQos round trip', (t) => {
  t.is(encodeQos(7, 'c0ffee01'), '{"n":7,"boot":"c0ffee01"}');
  t.deepEqual(parseQos(encodeQos(7, 'x')), { n: 7, boot: 'x' });
  t.deepEqual(parseQos('{"n":3}'), { n: 3 });
  t.is(parseQos('{"n":3'), null);
});

test('a huge jump is counted as missing without tracking each number', (t) => {
  const s = new PeerStats();
  s.take({ n: 0, boot: 'b' });
  t.is(s.take({ n: MAX_TRACKED_GAP + 2, boot: 'b' }), 'skip');
  t.is(s.missing, MAX_TRACKED_GAP + 1);
  t.is(s.take({ n: 5, boot: 'b' }), 'duplicate', 'untracked: a late one cannot be told from a repeat');
});

test('random shuffles of a sequence with repeats: the counts add up', (t) => {
  const seed = Number(process.env.TETHER_SEED ?? 0x5eed);
  const rnd = prng(seed);
  for (let round = 0; round < 50; round++) {
    const n = 1 + Math.floor(rnd() * 200);
    const order = Array.from({ length: n }, (_, i) => i);
    // Local disorder: swap neighbours now and then, drop some, repeat some (0 stays first).
    for (let i = 2; i < n; i++) if (rnd() < 0.2) [order[i - 1], order[i]] = [order[i], order[i - 1]];
    const sent = order.filter((x) => x === 0 || rnd() > 0.1);
    const withDupes = sent.flatMap((x) => (rnd() < 0.1 ? [x, x] : [x]));
    const s = new PeerStats();
    feed(s, withDupes);
    const distinct = new Set(sent);
    t.is(s.unique, distinct.size, `seed ${seed} round ${round}`);
    t.is(s.duplicates, withDupes.length - distinct.size, `seed ${seed} round ${round}`);
    // Missing: numbers below the highest that never came.
    const hi = Math.max(...withDupes);
    let expectMissing = 0;
    for (let i = 0; i < hi; i++) if (!distinct.has(i)) expectMissing++;
    t.is(s.missing, expectMissing, `seed ${seed} round ${round}`);
  }
});

test('QosStats keeps one PeerStats per peer, totals them and prints a table', (t) => {
  const q = new QosStats();
  q.take('dev-10', encodeQos(0, 'a'));
  q.take('dev-2', encodeQos(0, 'b'));
  q.take('dev-2', encodeQos(0, 'b'));
  q.take('dev-2', encodeQos(2, 'b'));
  q.take('dev-2', 'junk');
  q.peer('dev-10').sent = 5;
  t.deepEqual(
    q.peers().map(([p]) => p),
    ['dev-2', 'dev-10'],
  );
  t.deepEqual(q.totals(), { peers: 2, sent: 5, received: 4, duplicates: 1, missing: 1, outOfOrder: 0, restarts: 0, invalid: 1 });
  const lines = q.table('client').split('\n');
  t.is(lines.length, 3);
  t.regex(lines[0], /^client\s+sent\s+received\s+dupes\s+missing\s+out of order\s+restarts\s+invalid$/);
  t.regex(lines[1], /^dev-2\s+0\s+3\s+1\s+1\s+0\s+0\s+1$/);
  t.regex(lines[2], /^dev-10\s+5\s+1\s+0\s+0\s+0\s+0\s+0$/);
});

test('renderTable aligns columns', (t) => {
  t.is(renderTable(['a', 'bb'], [['xyz', 1], ['q', 100]]), 'a     bb\nxyz    1\nq    100');
});
