// imgresume's upload page (twistd imgresume --http ... --upload-page; docs/http.md).
// Plain JavaScript against tus 1.0.0 at files/ of this same origin: no library.
//
// Each file is created with a POST (its SHA-256 as Repr-Digest when the
// browser can compute it), then sent in PATCHes of CHUNK bytes.  After any
// failure it asks the server where the upload stands (HEAD: the offset the
// server has made durable) and goes on from there, after a growing delay.
// The upload's URL is kept in localStorage under the file's fingerprint
// (name, size, last modification), so choosing the same file after a reload
// continues it.
'use strict'

const ENDPOINT = new URL('files/', document.baseURI).href
const CHUNK = 8 * 1024 * 1024 // one PATCH: the most a failure makes us send again
const DIGEST_LIMIT = 512 * 1024 * 1024 // crypto.subtle hashes a whole buffer in memory
const DELAYS = [0, 1000, 2000, 4000, 8000, 15000, 30000] // then every 30 s, for ever
const PARALLEL = 3
const KEEP = 'imgresume-tus:' // localStorage key prefix: fingerprint -> {url, name, size}

const $ = (id) => document.getElementById(id)
const uploads = []

// -- the browser's memory of unfinished uploads ------------------------------

function fingerprint (file) {
  return KEEP + JSON.stringify([file.name, file.size, file.lastModified])
}

function remembered (file) {
  try {
    return JSON.parse(localStorage.getItem(fingerprint(file)) || 'null')
  } catch (e) {
    return null
  }
}

function remember (u) {
  localStorage.setItem(u.fp, JSON.stringify({ url: u.url, name: u.file.name, size: u.file.size }))
}

function forget (u) {
  localStorage.removeItem(u.fp)
}

// -- HTTP ----------------------------------------------------------------------

class Refused extends Error {
  constructor (message, status, retry, after) {
    super(message)
    this.status = status
    this.retry = retry // a later attempt may succeed
    this.after = after // the server's Retry-After, in ms
  }
}

class Stopped extends Error {}

function send (u, method, url, headers, body) {
  return new Promise((resolve, reject) => {
    if (u.state !== 'running') return reject(new Stopped('paused'))
    const xhr = new XMLHttpRequest()
    u.xhr = xhr
    xhr.open(method, url)
    xhr.setRequestHeader('Tus-Resumable', '1.0.0')
    const key = $('key').value.trim()
    if (key) xhr.setRequestHeader('Authorization', 'Bearer ' + key)
    for (const [name, value] of Object.entries(headers)) xhr.setRequestHeader(name, value)
    if (body) xhr.upload.onprogress = (ev) => show(u, u.offset + ev.loaded)
    xhr.onload = () => resolve(xhr)
    xhr.onerror = () => reject(new Refused('the connection failed', 0, true, 0))
    xhr.onabort = () => reject(new Stopped('paused'))
    xhr.send(body || null)
  })
}

function expect (xhr, ...statuses) {
  if (statuses.includes(xhr.status)) return xhr
  const s = xhr.status
  const reason = (xhr.responseText || '').trim() || `HTTP ${s}`
  const after = 1000 * Number(xhr.getResponseHeader('Retry-After') || 0)
  throw new Refused(reason, s, s === 409 || s === 423 || s === 429 || s >= 500, after)
}

function base64 (buffer) {
  return btoa(String.fromCharCode(...new Uint8Array(buffer)))
}

// Repr-Digest (RFC 9530) of the whole file, for the server to check before
// it publishes the file; only where crypto.subtle exists (a secure context:
// HTTPS or localhost) and the file fits DIGEST_LIMIT (read whole to hash).
async function reprDigest (u) {
  if (!(window.crypto && crypto.subtle) || u.file.size > DIGEST_LIMIT) return null
  status(u, 'computing its SHA-256')
  const digest = await crypto.subtle.digest('SHA-256', await u.file.arrayBuffer())
  return `sha-256=:${base64(digest)}:`
}

// -- tus -------------------------------------------------------------------------

async function create (u) {
  const headers = {
    'Upload-Length': String(u.file.size),
    'Upload-Metadata': 'filename ' + base64(new TextEncoder().encode(u.file.name))
  }
  const digest = await reprDigest(u)
  if (digest) {
    headers['Repr-Digest'] = digest
    u.digested = true
  }
  const xhr = expect(await send(u, 'POST', ENDPOINT, headers), 201)
  u.url = new URL(xhr.getResponseHeader('Location'), ENDPOINT).href
  u.offset = Number(xhr.getResponseHeader('Upload-Offset') || 0)
  remember(u)
}

// Where the server stands: the offset it has made durable.
async function head (u) {
  const xhr = await send(u, 'HEAD', u.url, {})
  if (xhr.status === 404 || xhr.status === 410) { // gone (expired, or another server's past)
    forget(u)
    u.url = null
    return create(u)
  }
  expect(xhr, 200)
  u.offset = Number(xhr.getResponseHeader('Upload-Offset'))
}

async function patch (u) {
  const end = Math.min(u.offset + CHUNK, u.file.size)
  const headers = { 'Content-Type': 'application/offset+octet-stream', 'Upload-Offset': String(u.offset) }
  const xhr = await send(u, 'PATCH', u.url, headers, u.file.slice(u.offset, end))
  if (xhr.status === 409 && xhr.getResponseHeader('Upload-Offset') !== null) {
    u.offset = Number(xhr.getResponseHeader('Upload-Offset')) // go on from the server's offset
    return
  }
  expect(xhr, 204)
  u.offset = Number(xhr.getResponseHeader('Upload-Offset'))
  u.attempt = 0
  if (u.offset === u.file.size) u.stored = xhr.getResponseHeader('Repr-Digest')
}

// One upload to its end: create or find it, PATCH the rest; on a failure
// that may pass, wait (DELAYS, or the server's Retry-After) and ask again.
async function run (u) {
  while (u.state === 'running') {
    try {
      if (u.url) await head(u)
      else await create(u)
      status(u, 'uploading')
      while (u.offset < u.file.size) await patch(u)
      return finish(u)
    } catch (e) {
      if (e instanceof Stopped || u.state !== 'running') return
      if (!e.retry) return fail(u, e.message)
      const delay = Math.max(e.after || 0, DELAYS[Math.min(u.attempt++, DELAYS.length - 1)])
      status(u, `${e.message}: trying again in ${Math.round(delay / 1000)} s`)
      await sleep(u, delay)
    }
  }
}

function sleep (u, ms) {
  return new Promise((resolve) => {
    u.wake = () => { clearTimeout(u.timer); u.wake = null; resolve() }
    u.timer = setTimeout(u.wake, ms)
  })
}

// -- the uploads' lifecycle --------------------------------------------------------

function add (file) {
  const u = { file, fp: fingerprint(file), url: null, offset: 0, attempt: 0, state: 'queued' }
  const known = remembered(file)
  if (known) u.url = known.url
  if (uploads.some((o) => o.fp === u.fp && o.state !== 'failed')) return
  uploads.push(u)
  draw(u)
  status(u, known ? 'waiting (continues an earlier upload)' : 'waiting')
  pump()
}

function pump () {
  let running = uploads.filter((u) => u.state === 'running').length
  for (const u of uploads) {
    if (running >= PARALLEL) break
    if (u.state !== 'queued') continue
    u.state = 'running'
    running++
    setState(u)
    run(u).then(pump, (e) => { fail(u, String(e)); pump() })
  }
}

function pause (u) {
  u.state = 'paused'
  if (u.xhr) u.xhr.abort()
  if (u.wake) u.wake()
  setState(u)
  status(u, 'paused')
  pump()
}

function resume (u) {
  u.state = 'queued'
  u.attempt = 0
  setState(u)
  status(u, 'waiting')
  pump()
}

function finish (u) {
  u.state = 'done'
  forget(u)
  show(u, u.file.size)
  setState(u)
  u.el.dataset.url = u.url || ''
  status(u, 'stored' + (u.digested ? ', its SHA-256 checked by the server' : '') +
    (u.stored ? ` (${u.stored})` : ''))
  drawEarlier()
}

function fail (u, message) {
  u.state = 'failed'
  setState(u)
  status(u, 'failed: ' + message)
}

// -- the page -----------------------------------------------------------------------

function size (n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let i = 0
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++ }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`
}

function draw (u) {
  const li = document.createElement('li')
  li.innerHTML = '<div class="row"><span class="name"></span><span class="size"></span>' +
    '<button type="button"></button></div><progress max="1" value="0"></progress>' +
    '<div class="status"></div>'
  li.querySelector('.name').textContent = u.file.name
  li.querySelector('.size').textContent = size(u.file.size)
  li.querySelector('button').onclick = () => (u.state === 'paused' || u.state === 'failed' ? resume(u) : pause(u))
  li.dataset.fingerprint = u.fp
  u.el = li
  $('uploads').append(li)
  setState(u)
}

function setState (u) {
  u.el.dataset.state = u.state
  const button = u.el.querySelector('button')
  button.textContent = { paused: 'Resume', failed: 'Retry' }[u.state] || 'Pause'
  button.hidden = u.state === 'done'
}

function show (u, done) {
  u.el.querySelector('progress').value = u.file.size ? done / u.file.size : 1
  u.el.dataset.offset = String(done)
  u.el.querySelector('.size').textContent = `${size(done)} of ${size(u.file.size)}`
}

function status (u, text) {
  u.el.querySelector('.status').textContent = text
}

function drawEarlier () {
  const list = $('earlier-list')
  list.replaceChildren()
  for (let i = 0; i < localStorage.length; i++) {
    const key = localStorage.key(i)
    if (!key.startsWith(KEEP) || uploads.some((u) => u.fp === key)) continue
    let known
    try { known = JSON.parse(localStorage.getItem(key)) } catch (e) { continue }
    const li = document.createElement('li')
    li.textContent = `${known.name} (${size(known.size)}) `
    const button = document.createElement('button')
    button.type = 'button'
    button.textContent = 'Forget'
    button.onclick = () => { localStorage.removeItem(key); drawEarlier() }
    li.append(button)
    list.append(li)
  }
  $('earlier').hidden = !list.children.length
}

function start () {
  const drop = $('drop')
  $('pick').onchange = (ev) => { [...ev.target.files].forEach(add); ev.target.value = ''; drawEarlier() }
  drop.ondragover = (ev) => { ev.preventDefault(); drop.classList.add('over') }
  drop.ondragleave = () => drop.classList.remove('over')
  drop.ondrop = (ev) => {
    ev.preventDefault()
    drop.classList.remove('over')
    ;[...ev.dataTransfer.files].forEach(add)
    drawEarlier()
  }
  const key = $('key')
  key.value = sessionStorage.getItem('imgresume-key') || ''
  key.onchange = () => sessionStorage.setItem('imgresume-key', key.value.trim())
  // Back online: the uploads waiting to try again try now.
  window.addEventListener('online', () => uploads.forEach((u) => u.wake && u.wake()))
  drawEarlier()
}

start()
