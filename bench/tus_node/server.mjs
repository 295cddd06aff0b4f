// The tus-node-server baseline of `python -m bench` (bench/tus.py copies this
// file next to its node_modules and runs it there).
//
//   node server.mjs DIRECTORY
//
// @tus/server with @tus/file-store storing into DIRECTORY, as in their
// README: no option changed (no fsync, no checksum: neither package has
// either).  Listens on 127.0.0.1, port chosen by the kernel, and prints
// {"port": N} on stdout once it accepts connections.  Exits when its stdin
// closes, so it never outlives the bench that started it, however that ends.
import { Server } from '@tus/server'
import { FileStore } from '@tus/file-store'

const [directory] = process.argv.slice(2)
if (!directory) {
  console.error('usage: node server.mjs DIRECTORY')
  process.exit(2)
}
const tus = new Server({ path: '/files', datastore: new FileStore({ directory }) })
const http = tus.listen({ host: '127.0.0.1', port: 0 }, () => {
  process.stdout.write(JSON.stringify({ port: http.address().port, pid: process.pid }) + '\n')
})
http.on('error', (err) => {
  console.error(err)
  process.exit(1)
})
process.stdin.on('end', () => process.exit(0))
process.stdin.on('error', () => process.exit(0))
process.stdin.resume()
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0))
