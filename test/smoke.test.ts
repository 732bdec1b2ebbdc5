import test from 'ava';
import { Server, Client, silentLogger } from '../src';

test('a client and the server exchange one line each way', async (t) => {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: 1000, logger: silentLogger });
  const c = new Client({ id: 'a', port: server.port, timeout: 1000 });
  await c.connect();
  const conn = await server.clientConn('a');
  await c.write('hello');
  t.is(await conn.readline(), 'hello\n');
  await conn.write('back');
  t.is(await c.readline(), 'back\n');
  c.close();
  await server.close();
});
