// The tus-js-client baseline of `python -m bench` (bench/tus.py copies this
// file next to its node_modules and runs it there).
//
//   node client.mjs SPEC_FILE
//
// SPEC_FILE holds a JSON object: {"endpoint": URL, "files": [PATH, ...],
// "chunk_size": BYTES or null (Infinity: one PATCH per file), "parallel": N
// (files at once, 1), "timeout": SECONDS}.  Each file is uploaded from
// fs.createReadStream(PATH) (tus-js-client then reads ranges of the file
// itself, nothing buffered), no retries (a failure counts as one), no URL
// storage.  The last stdout line is the result: per file its upload URL,
// start and end (CLOCK_MONOTONIC seconds, as the harness's), PATCH requests
// and any error; the run's start, end and CPU seconds (process.cpuUsage:
// user + system, all threads) over the uploads.  Exits when its stdin closes
// (the bench is gone) or after "timeout" seconds.
import fs from 'node:fs'
import * as tus from 'tus-js-client'

const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'))
const chunkSize = spec.chunk_size == null ? Infinity : spec.chunk_size
const parallel = spec.parallel || 1
const mono = () => Number(process.hrtime.bigint()) / 1e9

process.stdin.on('end', () => process.exit(3))
process.stdin.on('error', () => process.exit(3))
process.stdin.resume()
setTimeout(() => {
  console.error(`client: timed out after ${spec.timeout} s`)
  process.exit(4)
}, (spec.timeout || 600) * 1000).unref()

function uploadOne(path) {
  return new Promise((resolve) => {
    const rec = { path, start: mono(), patches: 0 }
    const size = fs.statSync(path).size
    const upload = new tus.Upload(fs.createReadStream(path), {
      endpoint: spec.endpoint,
      chunkSize,
      uploadSize: size,
      retryDelays: null,
      storeFingerprintForResuming: false,
      metadata: { filename: path.split('/').pop() },
      onChunkComplete: () => { rec.patches += 1 },
      onError: (err) => {
        rec.end = mono()
        rec.error = String(err && err.message ? err.message : err).slice(0, 300)
        resolve(rec)
      },
      onSuccess: () => {
        rec.end = mono()
        rec.url = upload.url
        rec.bytes = size
        resolve(rec)
      },
    })
    upload.start()
  })
}

const cpu0 = process.cpuUsage()
const start = mono()
const results = new Array(spec.files.length)
let next = 0
async function lane() {
  while (next < spec.files.length) {
    const i = next++
    results[i] = await uploadOne(spec.files[i])
  }
}
await Promise.all(Array.from({ length: Math.min(parallel, spec.files.length) }, lane))
const end = mono()
const cpu = process.cpuUsage(cpu0)
process.stdout.write(JSON.stringify({
  start, end, cpu: (cpu.user + cpu.system) / 1e6, files: results,
}) + '\n')
process.exit(0)
