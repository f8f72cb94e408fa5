// The Duet page: talk to the server from a browser, over WebRTC or the WebSocket, with the OpenAI Realtime
// protocol's own events (plus Duet's opt-in ones: reasoning, per-turn metrics).
//
// WebSocket: the page captures 24 kHz pcm16 in an AudioWorklet and sends input_audio_buffer.append; it
//   plays reply audio deltas itself, scheduled back to back, and on a barge-in (speech_started) it flushes
//   what is queued and sends conversation.item.truncate with what was played.
// WebRTC: Opus both ways on the peer connection, events on the "oai-events" data channel; the server holds
//   the reply queue, so on a barge-in the server flushes and truncates (the page only watches).
//
// window.duet exposes counters and a speech injector for the browser tests and the latency bench.

const RATE = 24000; // the protocol's pcm16 rate, both ways
const VOICE_RMS = 0.01; // -40 dBFS: the user is speaking (the page's own end-of-speech mark)
const REPLY_RMS = 0.003; // -50 dBFS: reply audio is sounding on the WebRTC track
const MAX_TURNS_SHOWN = 12;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

const stats = {
  transport: null, connected: false, sessionId: null,
  events: {}, // server event type -> count
  speechStarted: 0, userTranscripts: 0, replyTranscripts: 0, responses: 0,
  audioDeltas: 0, receivedMs: 0, playedMs: 0, underruns: 0,
  flushes: 0, flushedMs: 0, truncatesSent: 0, truncated: 0, cleared: 0,
  errors: [],
};
const turns = [];
window.duet = {
  stats, turns, connect, disconnect, inject, send: (event) => conn && conn.send(event),
  // Reply audio played so far (WebSocket: scheduled and rendered; WebRTC: sounding on the track), and
  // reply audio waiting in the page's own queue (WebSocket only: with WebRTC the queue is the server's).
  playedMs: () => (conn && conn.kind === "websocket" ? io.player.totalPlayedMs() : stats.playedMs),
  queuedMs: () => (conn && conn.kind === "websocket" ? io.player.queuedMs() : 0),
};

// ---- audio ---------------------------------------------------------------------------------------

class AudioIO {
  async init() {
    if (this.ctx) return;
    try {
      // At the protocol's rate, the browser resamples mic and output itself (with proper filters).
      this.ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
    } catch {
      this.ctx = new AudioContext({ latencyHint: "interactive" }); // the worklet resamples instead
    }
    await this.ctx.audioWorklet.addModule("/web/worklets.js");
    this.mix = this.ctx.createGain(); // everything the user says: the mic, and test injections
    this.gate = this.ctx.createGain(); // closed by push to talk
    this.mix.connect(this.gate);
    this.capture = new AudioWorkletNode(this.ctx, "duet-capture", {
      channelCount: 1, channelCountMode: "explicit", processorOptions: { send: false },
    });
    this.gate.connect(this.capture);
    // Worklets run only while pulled by the destination: a muted sink keeps them running, silently.
    this.sink = this.ctx.createGain();
    this.sink.gain.value = 0;
    this.sink.connect(this.ctx.destination);
    this.capture.connect(this.sink);
    this.outgoing = this.ctx.createMediaStreamDestination(); // the WebRTC track
    this.outgoing.channelCount = 1;
    this.gate.connect(this.outgoing);
    this.player = new Player(this);
    this.capture.port.onmessage = (e) => onCaptured(e.data);
  }

  async openMic() {
    if (this.mic) return;
    // Echo cancellation on: the reply plays from the speakers while the mic is open (barge-in needs it).
    this.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    this.micSource = this.ctx.createMediaStreamSource(this.mic);
    this.micSource.connect(this.mix);
  }

  closeMic() {
    if (!this.mic) return;
    this.micSource.disconnect();
    for (const track of this.mic.getTracks()) track.stop();
    this.mic = null;
  }

  // When a sample at context time `t` reaches the speaker, on the performance.now() clock.
  perfTime(t) {
    const ts = this.ctx.getOutputTimestamp();
    return ts.performanceTime + (t - ts.contextTime) * 1000;
  }
}

// WebSocket playback: reply chunks scheduled back to back as AudioBufferSourceNodes (gapless), with the
// segments of each assistant item kept so a barge-in knows how much of it was played.
class Player {
  constructor(io) {
    this.io = io;
    this.ctx = io.ctx;
    this.out = this.ctx.createGain();
    this.out.connect(this.ctx.destination);
    this.playhead = 0;
    this.live = new Set(); // scheduled, not ended
    this.items = new Map(); // item id -> [{start, dur}]
    this.retiredMs = 0; // played audio of forgotten items
  }

  push(itemId, pcm) {
    const n = pcm.length;
    if (!n) return null;
    const buffer = this.ctx.createBuffer(1, n, RATE);
    const ch = buffer.getChannelData(0);
    for (let i = 0; i < n; i++) ch[i] = pcm[i] / 32768;
    const now = this.ctx.currentTime;
    if (this.playhead < now + 0.005) {
      if (this.playhead > 0 && this.live.size) stats.underruns++;
      this.playhead = now + 0.03; // start (or restart after running dry) just ahead of the render clock
    }
    const src = this.ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(this.out);
    src.start(this.playhead);
    const seg = { start: this.playhead, dur: buffer.duration, src };
    src.onended = () => this.live.delete(seg);
    this.live.add(seg);
    if (!this.items.has(itemId)) this.items.set(itemId, []);
    this.items.get(itemId).push(seg);
    const start = this.playhead;
    this.playhead += buffer.duration;
    return start;
  }

  heard() {
    return this.ctx.currentTime - (this.ctx.outputLatency || 0);
  }

  playedMs(itemId, t = this.heard()) {
    let s = 0;
    for (const seg of this.items.get(itemId) || []) s += Math.min(Math.max(t - seg.start, 0), seg.dur);
    return Math.round(s * 1000);
  }

  totalPlayedMs() {
    let ms = this.retiredMs;
    for (const id of this.items.keys()) ms += this.playedMs(id, this.ctx.currentTime);
    return ms;
  }

  unplayed(itemId) {
    const segs = this.items.get(itemId);
    if (!segs || !segs.length) return false;
    const last = segs[segs.length - 1];
    return last.start + last.dur > this.heard();
  }

  queuedMs() {
    return Math.max(0, this.playhead - this.ctx.currentTime) * 1000;
  }

  // Stop everything scheduled; the played part of each segment stays counted. Returns ms dropped.
  flush() {
    const t = this.ctx.currentTime;
    let dropped = 0;
    for (const seg of this.live) {
      const played = Math.min(Math.max(t - seg.start, 0), seg.dur);
      dropped += seg.dur - played;
      seg.dur = played;
      try { seg.src.stop(); } catch { /* already stopped */ }
    }
    this.live.clear();
    this.playhead = 0;
    return Math.round(dropped * 1000);
  }

  forget(itemId) {
    this.retiredMs += this.playedMs(itemId, this.ctx.currentTime);
    this.items.delete(itemId);
  }
}

// WebRTC playback: the track plays in an <audio> element; a meter worklet taps it (Chrome feeds a remote
// track to Web Audio only while a media element also plays it) to count reply audio and time its first sound.
class RemotePlayback {
  constructor(io, stream) {
    this.el = document.createElement("audio");
    this.el.autoplay = true;
    this.el.srcObject = stream;
    this.el.play().catch((err) => showError(`reply audio cannot autoplay: ${err.message}`));
    this.source = io.ctx.createMediaStreamSource(stream);
    this.meter = new AudioWorkletNode(io.ctx, "duet-meter");
    this.source.connect(this.meter);
    this.meter.connect(io.sink);
    this.meter.port.onmessage = (e) => {
      const { rms, ms, time } = e.data;
      $("reply-level").value = Math.min(1, rms * 4);
      if (rms < REPLY_RMS) return;
      stats.playedMs += ms;
      replySounded(io.perfTime(time - ms / 1000));
    };
  }

  close() {
    this.source.disconnect();
    this.meter.disconnect();
    this.el.srcObject = null;
  }
}

const io = new AudioIO();
let lastVoiceAt = null; // performance.now() of the last captured block with voice in it

function onCaptured({ rms, pcm }) {
  $("mic-level").value = Math.min(1, rms * 4);
  if (rms > VOICE_RMS) lastVoiceAt = performance.now();
  if (pcm && conn && conn.kind === "websocket") conn.sendAudio(pcm);
}

// Test hook (and a way to try the page without a mic): play pcm16 (base64, mono) into what the user says,
// as a second voice in the room would; it goes wherever the mic goes.
async function inject(base64, rate = RATE) {
  await io.init();
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  const buffer = io.ctx.createBuffer(1, pcm.length, rate);
  const ch = buffer.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  const src = io.ctx.createBufferSource();
  src.buffer = buffer;
  src.connect(io.mix);
  src.start();
  return buffer.duration;
}

// ---- connections ---------------------------------------------------------------------------------

let conn = null;

function b64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

class WsConnection {
  kind = "websocket";

  async open(key) {
    const url = new URL("/v1/realtime", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("duet_events", "all"); // reasoning and turn metrics, before session.created
    // Browsers cannot set headers on a WebSocket: the key rides in a subprotocol, as with OpenAI.
    const protocols = ["realtime"];
    if (key) protocols.push(`openai-insecure-api-key.${key}`);
    const ws = (this.ws = new WebSocket(url, protocols));
    ws.onmessage = (e) => onServerEvent(JSON.parse(e.data));
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error("the WebSocket connection was refused (key? origin?)"));
    });
    ws.onclose = (e) => connectionLost(`WebSocket closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
    io.capture.port.postMessage({ send: true });
  }

  send(event) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(event));
  }

  sendAudio(pcm) {
    this.send({ type: "input_audio_buffer.append", audio: b64(pcm) });
  }

  close() {
    io.capture.port.postMessage({ send: false });
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.close(1000);
    }
  }
}

class RtcConnection {
  kind = "webrtc";

  async open(key) {
    const pc = (this.pc = new RTCPeerConnection());
    const dc = (this.dc = pc.createDataChannel("oai-events"));
    dc.onmessage = (e) => onServerEvent(JSON.parse(e.data));
    const stream = io.outgoing.stream;
    pc.addTrack(stream.getAudioTracks()[0], stream);
    pc.ontrack = (e) => { this.remote = new RemotePlayback(io, e.streams[0] || new MediaStream([e.track])); };
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, 3000); // the server does not trickle: every candidate goes in the offer
    const url = new URL("/v1/realtime/calls", location.href);
    url.searchParams.set("duet_events", "all");
    const headers = { "Content-Type": "application/sdp" };
    if (key) headers.Authorization = `Bearer ${key}`;
    const res = await fetch(url, { method: "POST", body: pc.localDescription.sdp, headers });
    if (res.status !== 201) throw new Error(`the server refused the call: ${res.status} ${await res.text()}`);
    await pc.setRemoteDescription({ type: "answer", sdp: await res.text() });
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("the WebRTC connection did not open")), 15000);
      dc.onopen = () => { clearTimeout(timer); resolve(); };
    });
    dc.onclose = () => connectionLost("the WebRTC data channel closed");
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed") connectionLost("the WebRTC connection failed");
    };
  }

  send(event) {
    if (this.dc && this.dc.readyState === "open") this.dc.send(JSON.stringify(event));
  }

  close() {
    if (this.remote) this.remote.close();
    if (this.dc) this.dc.onclose = null;
    if (this.pc) this.pc.close();
  }
}

function iceGathered(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, timeoutMs); // go with the candidates found so far
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}

// A real key is traded for a short-lived ek_ client secret first, so the key itself never rides in a
// WebSocket subprotocol (which proxies log); an ek_ key is used as it is.
async function resolveKey(key) {
  if (!key || key.startsWith("ek_")) return key;
  const res = await fetch("/v1/realtime/client_secrets", {
    method: "POST", headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" }, body: "{}",
  });
  if (!res.ok) throw new Error(`the key was refused (${res.status})`);
  return (await res.json()).value;
}

async function connect() {
  if (conn) return;
  clearErrors();
  setStatus("connecting", "connecting…");
  try {
    await io.init();
    await io.ctx.resume();
    const key = await resolveKey($("key").value.trim());
    await io.openMic(); // first: the browser asks for the mic before any call starts
    const choice = $("transport").value;
    const webrtc = "RTCPeerConnection" in window && choice !== "websocket";
    if (webrtc) {
      try {
        conn = new RtcConnection();
        await conn.open(key);
      } catch (err) {
        if (conn) conn.close();
        conn = null;
        if (choice === "webrtc") throw err;
        showError(`WebRTC failed (${err.message}); using the WebSocket`);
      }
    }
    if (!conn) {
      conn = new WsConnection();
      await conn.open(key);
    }
    stats.transport = conn.kind;
    stats.connected = true;
    $("transport-badge").textContent = conn.kind === "webrtc" ? "WebRTC" : "WebSocket";
    $("transport-badge").hidden = false;
    $("connect").textContent = "Disconnect";
    $("talk").disabled = $("mic-mode").value !== "ptt";
    applyMicMode();
    setStatus("live", "listening");
  } catch (err) {
    if (conn) conn.close();
    conn = null;
    setStatus("error", "not connected");
    showError(err.message || String(err));
  }
}

function disconnect() {
  if (!conn) return;
  conn.close();
  conn = null;
  io.player.flush();
  io.closeMic();
  stats.connected = false;
  $("connect").textContent = "Connect";
  $("talk").disabled = true;
  $("transport-badge").hidden = true;
  setStatus("idle", "not connected");
}

function connectionLost(why) {
  if (!conn) return;
  disconnect();
  setStatus("error", "disconnected");
  showError(why);
}

function sessionUpdate() {
  const duet = { events: ["all"] };
  const pacing = $("pacing").value;
  if (pacing) duet.pacing = pacing;
  window.duet.send({ type: "session.update", session: { duet } });
}

// ---- push to talk --------------------------------------------------------------------------------

let pressed = false;

function applyMicMode() {
  const ptt = $("mic-mode").value === "ptt";
  $("talk").disabled = !conn || !ptt;
  io.gate && (io.gate.gain.value = ptt && !pressed ? 0 : 1);
}

function press(down) {
  if ($("mic-mode").value !== "ptt" || !conn || pressed === down) return;
  pressed = down;
  $("talk").setAttribute("aria-pressed", String(down));
  io.gate.gain.value = down ? 1 : 0;
  // Pressing is a clear wish to speak: stop the reply now rather than wait for the server's VAD.
  if (down) bargeIn("push to talk");
}

// ---- server events -------------------------------------------------------------------------------

const byResponse = new Map();
const truncatedItems = new Set();
let silenceMs = 500;

function turnFor(userItem) {
  let t = turns.find((x) => x.userItem === userItem);
  if (!t) {
    t = newTurn({ userItem });
  }
  return t;
}

function newTurn(fields) {
  const t = {
    n: turns.length + 1, userItem: null, user: null, partial: "", speaking: false, responseId: null,
    assistantItem: null, reply: "", thought: "", speechEndAt: null, firstAudioAt: null, latencyMs: null,
    metrics: null, status: null, truncatedAtMs: null, transport: conn ? conn.kind : null, ...fields,
  };
  turns.push(t);
  return t;
}

function onServerEvent(e) {
  stats.events[e.type] = (stats.events[e.type] || 0) + 1;
  switch (e.type) {
    case "session.created":
      stats.sessionId = e.session.id;
      readSession(e.session);
      sessionUpdate();
      break;
    case "session.updated":
      readSession(e.session);
      break;
    case "input_audio_buffer.speech_started":
      stats.speechStarted++;
      bargeIn("speech_started");
      newTurn({ userItem: e.item_id, speaking: true });
      setStatus("live", "hearing you");
      break;
    case "input_audio_buffer.speech_stopped": {
      const t = turnFor(e.item_id);
      t.speaking = false;
      // The end of speech in what the page sent: its last voiced block, if recent (else the server's
      // silence window is the best guess).
      const now = performance.now();
      t.speechEndAt = lastVoiceAt !== null && now - lastVoiceAt < 3000 ? lastVoiceAt : now - silenceMs;
      setStatus("live", "thinking");
      break;
    }
    case "duet.input_transcript.partial":
      turnFor(e.item_id).partial = e.transcript;
      render(turnFor(e.item_id));
      break;
    case "conversation.item.input_audio_transcription.completed": {
      const t = turnFor(e.item_id);
      t.user = e.transcript;
      stats.userTranscripts++;
      render(t);
      break;
    }
    case "response.created": {
      stats.responses++;
      const waiting = turns.filter((t) => !t.responseId && !t.speaking);
      const t = waiting.length ? waiting[waiting.length - 1] : newTurn({});
      t.responseId = e.response.id;
      byResponse.set(t.responseId, t);
      break;
    }
    case "response.output_item.added": {
      const t = byResponse.get(e.response_id);
      if (t && !t.assistantItem && (e.item.type || "message") === "message") t.assistantItem = e.item.id;
      break;
    }
    case "response.output_audio.delta":
    case "response.audio.delta":
      onAudioDelta(e);
      break;
    case "response.output_audio_transcript.delta":
    case "response.audio_transcript.delta":
    case "response.output_text.delta":
    case "response.text.delta": {
      const t = byResponse.get(e.response_id);
      if (t && !truncatedItems.has(e.item_id)) {
        t.reply += e.delta;
        render(t);
      }
      break;
    }
    case "response.output_audio_transcript.done":
    case "response.audio_transcript.done": {
      // The final word on what the item says: after a barge-in, the part the user heard.
      const t = byResponse.get(e.response_id);
      if (t) {
        t.reply = e.transcript;
        stats.replyTranscripts++;
        render(t);
      }
      break;
    }
    case "duet.thought.delta": {
      const t = byResponse.get(e.response_id);
      if (t) {
        t.thought += e.delta;
        renderThought(t);
      }
      break;
    }
    case "duet.turn.metrics": {
      const t = byResponse.get(e.response_id);
      if (t) {
        t.metrics = e.metrics;
        renderLatency();
      }
      break;
    }
    case "conversation.item.truncated": {
      stats.truncated++;
      truncatedItems.add(e.item_id);
      const t = turns.find((x) => x.assistantItem === e.item_id);
      if (t) {
        t.truncatedAtMs = e.audio_end_ms;
        render(t);
      }
      break;
    }
    case "output_audio_buffer.started":
      replyStarted(e.response_id);
      break;
    case "output_audio_buffer.stopped":
      soundTurn = null;
      break;
    case "output_audio_buffer.cleared":
      stats.cleared++; // WebRTC: the server dropped its queued reply audio
      soundTurn = null;
      break;
    case "response.done": {
      const t = byResponse.get(e.response.id);
      if (t) {
        t.status = e.response.status;
        render(t);
      }
      setStatus("live", "listening");
      break;
    }
    case "error":
      showError(`${e.error.code || e.error.type}: ${e.error.message}`);
      break;
  }
}

function readSession(session) {
  const td = (session.audio && session.audio.input && session.audio.input.turn_detection) || session.turn_detection;
  if (td && typeof td.silence_duration_ms === "number") silenceMs = td.silence_duration_ms;
  const pacing = session.duet && session.duet.pacing;
  if (pacing && !$("pacing").value) $("pacing").value = pacing;
}

function onAudioDelta(e) {
  const t = byResponse.get(e.response_id);
  if (!t || truncatedItems.has(e.item_id)) return; // sent before the server heard of the barge-in
  const bytes = Uint8Array.from(atob(e.delta), (c) => c.charCodeAt(0));
  const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  stats.audioDeltas++;
  stats.receivedMs += (pcm.length * 1000) / RATE;
  t.assistantItem = t.assistantItem || e.item_id;
  const start = io.player.push(e.item_id, pcm);
  if (start !== null && t.firstAudioAt === null) setFirstAudio(t, io.perfTime(start));
}

// WebRTC: the server announces each response's audio on the track (output_audio_buffer.started) and sends
// digital silence between replies, so the first sound after that announcement is the response's first audio.
// The sound may beat the announcement (the data channel and the media path race): keep an unclaimed onset.
let soundTurn = null;
let orphanSoundAt = null;

function replySounded(at) {
  if (soundTurn && soundTurn.firstAudioAt === null) setFirstAudio(soundTurn, at);
  else if (!soundTurn) orphanSoundAt = orphanSoundAt ?? at;
}

function replyStarted(responseId) {
  const t = byResponse.get(responseId);
  if (!t || t.firstAudioAt !== null) return;
  soundTurn = t;
  if (orphanSoundAt !== null && performance.now() - orphanSoundAt < 1000) setFirstAudio(t, orphanSoundAt);
  orphanSoundAt = null;
}

function setFirstAudio(t, at) {
  t.firstAudioAt = at;
  if (t.speechEndAt !== null) t.latencyMs = Math.round(at - t.speechEndAt);
  setStatus("live", "speaking");
  renderLatency();
}

// Barge-in. WebSocket: flush what is queued here, and truncate every reply not played in full to what
// was played, so the server's history holds what the user heard. WebRTC: the queue is the server's; it
// flushes and truncates itself on speech_started, and push to talk asks it to with output_audio_buffer.clear.
function bargeIn(why) {
  if (!conn) return;
  if (conn.kind === "webrtc") {
    if (why === "push to talk") conn.send({ type: "output_audio_buffer.clear" });
    return;
  }
  const player = io.player;
  const cut = [];
  for (const itemId of player.items.keys()) {
    if (truncatedItems.has(itemId)) continue;
    const t = turns.find((x) => x.assistantItem === itemId);
    if (player.unplayed(itemId) || (t && t.status === null)) cut.push(itemId);
  }
  const played = new Map(cut.map((id) => [id, player.playedMs(id)]));
  const dropped = player.flush();
  if (dropped > 0) {
    stats.flushes++;
    stats.flushedMs += dropped;
  }
  for (const itemId of cut) {
    truncatedItems.add(itemId);
    conn.send({ type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: played.get(itemId) });
    stats.truncatesSent++;
  }
  for (const itemId of [...player.items.keys()]) if (truncatedItems.has(itemId) || !player.unplayed(itemId)) player.forget(itemId);
}

// ---- rendering -----------------------------------------------------------------------------------

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function showError(text) {
  stats.errors.push(text);
  const line = document.createElement("div");
  line.textContent = text;
  $("errors").append(line);
}

function clearErrors() {
  $("errors").textContent = "";
}

function bubble(t, role) {
  const key = `${role}El`;
  if (!t[key]) {
    t[key] = document.createElement("div");
    t[key].className = `bubble ${role}`;
    $("transcript").append(t[key]);
  }
  return t[key];
}

function render(t) {
  if (t.user !== null || t.partial) {
    const el = bubble(t, "user");
    el.textContent = t.user !== null ? t.user || "(nothing heard)" : "";
    if (t.user === null) {
      const p = document.createElement("span");
      p.className = "partial";
      p.textContent = t.partial;
      el.append(p);
    }
  }
  if (t.reply || t.responseId) {
    const el = bubble(t, "assistant");
    el.textContent = t.reply;
    el.classList.toggle("interrupted", t.truncatedAtMs !== null);
    if (t.truncatedAtMs !== null || (t.status && t.status !== "completed")) {
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = t.truncatedAtMs !== null ? `interrupted after ${(t.truncatedAtMs / 1000).toFixed(1)} s`
        : t.status;
      el.append(note);
    }
  }
  $("transcript").scrollTop = $("transcript").scrollHeight;
}

function renderThought(t) {
  if (!t.thoughtEl) {
    t.thoughtEl = document.createElement("div");
    t.thoughtEl.className = "turn";
    $("reasoning").append(t.thoughtEl);
  }
  t.thoughtEl.textContent = `#${t.n}: ${t.thought}`;
  $("reasoning").scrollTop = $("reasoning").scrollHeight;
}

const fmt = (ms) => (typeof ms === "number" ? `${Math.round(ms)} ms` : "–");

function renderLatency() {
  const shown = turns.filter((t) => t.latencyMs !== null || t.metrics).slice(-MAX_TURNS_SHOWN);
  const body = $("latency-table").tBodies[0];
  body.textContent = "";
  for (const t of shown) {
    const m = t.metrics || {};
    const row = body.insertRow();
    for (const v of [t.n, t.transport || "", fmt(t.latencyMs), fmt(m.transcript_ms), fmt(m.ab_first_token_ms),
      fmt(m.first_audio_sent_ms)]) row.insertCell().textContent = v;
  }
  drawChart(shown);
}

function drawChart(shown) {
  const canvas = $("chart");
  const g = canvas.getContext("2d");
  const css = getComputedStyle(document.documentElement);
  const W = canvas.width, H = canvas.height, left = 44, bottom = 22, top = 8;
  g.clearRect(0, 0, W, H);
  const values = shown.flatMap((t) => [t.latencyMs, t.metrics && t.metrics.first_audio_sent_ms]).filter((v) => typeof v === "number");
  const top_ = Math.max(1000, ...values);
  const step = [250, 500, 1000, 2000, 5000].find((s) => top_ / s <= 5) || 10000; // at most 5 gridlines
  const max = Math.ceil(top_ / step) * step;
  const y = (v) => top + (H - top - bottom) * (1 - v / max);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = css.getPropertyValue("--muted");
  g.strokeStyle = css.getPropertyValue("--line");
  for (let v = 0; v <= max; v += step) {
    g.beginPath();
    g.moveTo(left, y(v));
    g.lineTo(W, y(v));
    g.stroke();
    g.fillText(`${(v / 1000).toFixed(1)} s`, 4, y(v) + 4);
  }
  const slot = (W - left) / MAX_TURNS_SHOWN;
  const bar = Math.max(4, slot / 2 - 3);
  shown.forEach((t, i) => {
    const x = left + i * slot + 2;
    const server = t.metrics && t.metrics.first_audio_sent_ms;
    if (typeof t.latencyMs === "number") {
      g.fillStyle = css.getPropertyValue("--accent");
      g.fillRect(x, y(t.latencyMs), bar, y(0) - y(t.latencyMs));
    }
    if (typeof server === "number") {
      g.fillStyle = css.getPropertyValue("--server");
      g.fillRect(x + bar + 1, y(server), bar, y(0) - y(server));
    }
    g.fillStyle = css.getPropertyValue("--muted");
    g.fillText(String(t.n), x, H - 6);
  });
}

// The playback line under the transcript, and the counters the tests read.
function tick() {
  if (conn && conn.kind === "websocket" && io.player) {
    stats.playedMs = io.player.totalPlayedMs();
    const q = io.player.queuedMs();
    $("playback-state").textContent = q > 0 ? `${(q / 1000).toFixed(1)} s of reply queued` : "";
  } else {
    $("playback-state").textContent = "";
  }
  requestAnimationFrame(tick);
}

// ---- wiring --------------------------------------------------------------------------------------

function init() {
  for (const [param, id] of [["transport", "transport"], ["pacing", "pacing"], ["mic", "mic-mode"]]) {
    const v = params.get(param);
    if (v !== null && [...$(id).options].some((o) => o.value === v)) $(id).value = v;
  }
  if (!("RTCPeerConnection" in window)) {
    $("transport").value = "websocket";
    $("transport").querySelector('option[value="webrtc"]').disabled = true;
  }
  $("controls").addEventListener("submit", (e) => {
    e.preventDefault();
    if (conn) disconnect();
    else connect();
  });
  $("pacing").addEventListener("change", () => conn && sessionUpdate());
  $("mic-mode").addEventListener("change", applyMicMode);
  const talk = $("talk");
  talk.addEventListener("pointerdown", () => press(true));
  for (const ev of ["pointerup", "pointerleave", "pointercancel"]) talk.addEventListener(ev, () => press(false));
  window.addEventListener("keydown", (e) => {
    if (e.code === "Space" && !e.repeat && e.target === document.body) { e.preventDefault(); press(true); }
  });
  window.addEventListener("keyup", (e) => { if (e.code === "Space") press(false); });
  drawChart([]);
  requestAnimationFrame(tick);
  if (params.get("autoconnect") === "1") connect();
}

init();
