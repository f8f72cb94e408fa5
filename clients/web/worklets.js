// AudioWorklet processors for the Duet page (loaded with audioWorklet.addModule).
//
// duet-capture: what the user says (mic + test injections), resampled to 24 kHz mono and cut into 20 ms
//   blocks of pcm16 for input_audio_buffer.append; with each block, its level (RMS), so the page can tell
//   when the user stopped speaking for its own latency measurement.
// duet-meter: the reply as it is rendered (the WebRTC track, whose samples the page never sees otherwise):
//   level per 20 ms block, so the page can count the reply audio played and time its first sound.

const TARGET_RATE = 24000;
const BLOCK = 480; // 20 ms at 24 kHz

class Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.send = Boolean(options.processorOptions && options.processorOptions.send);
    this.step = sampleRate / TARGET_RATE; // input samples per output sample
    this.pos = 0; // fractional read position into `carry` + the current input
    this.prev = 0; // the last input sample of the previous quantum, for interpolation across the seam
    this.block = new Float32Array(BLOCK);
    this.filled = 0;
    this.port.onmessage = (e) => {
      if (typeof e.data.send === "boolean") this.send = e.data.send;
    };
  }

  process(inputs) {
    const input = inputs[0];
    const x = input && input.length ? input[0] : null; // mono: the first channel (the graph downmixes)
    const n = x ? x.length : 128;
    // Linear interpolation between consecutive input samples; exact passthrough when the context runs at
    // 24 kHz (Chrome honours AudioContext({sampleRate: 24000}) and resamples the mic itself, with filtering).
    while (this.pos < n) {
      const i = Math.floor(this.pos);
      const frac = this.pos - i;
      const a = i === 0 ? this.prev : (x ? x[i - 1] : 0);
      const b = x ? x[i] : 0;
      this.block[this.filled++] = this.step === 1 ? b : a + (b - a) * frac;
      this.pos += this.step;
      if (this.filled === BLOCK) this.flush();
    }
    this.pos -= n;
    this.prev = x ? x[n - 1] : 0;
    return true;
  }

  flush() {
    let sum = 0;
    for (let i = 0; i < BLOCK; i++) sum += this.block[i] * this.block[i];
    const msg = { rms: Math.sqrt(sum / BLOCK), time: currentTime };
    if (this.send) {
      const pcm = new Int16Array(BLOCK);
      for (let i = 0; i < BLOCK; i++) {
        const s = Math.max(-1, Math.min(1, this.block[i]));
        pcm[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
      }
      msg.pcm = pcm.buffer;
      this.port.postMessage(msg, [pcm.buffer]);
    } else {
      this.port.postMessage(msg);
    }
    this.filled = 0;
  }
}

class Meter extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.round(sampleRate / 50); // 20 ms
    this.sum = 0;
    this.count = 0;
  }

  process(inputs) {
    const input = inputs[0];
    const x = input && input.length ? input[0] : null;
    const n = x ? x.length : 128;
    for (let i = 0; i < n; i++) {
      const s = x ? x[i] : 0;
      this.sum += s * s;
      if (++this.count === this.size) {
        this.port.postMessage({ rms: Math.sqrt(this.sum / this.count), ms: 20, time: currentTime });
        this.sum = 0;
        this.count = 0;
      }
    }
    return true;
  }
}

registerProcessor("duet-capture", Capture);
registerProcessor("duet-meter", Meter);
