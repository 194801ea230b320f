// Run an export-adapter bundle with swappable adapters (--keep-adapters) in a browser, on onnxruntime-web.
//
// onnxruntime-web cannot take the adapter tensors the way the native runtimes do: it has no LoRA adapter API,
// and it refuses to feed a graph input that has a default initializer ("invalid input"), which is how a
// swappable bundle keeps the base runnable with no adapter active. So the page detaches those defaults from
// the graph before making the session (a few lines of protobuf, below), keeps them, and feeds every adapter
// input on every run: the active adapter's tensors, and the defaults for whatever it does not set.
//
// Every file is checked against the manifest's SHA-256 before use, and every adapter tensor against the
// graph's interface (names, shapes, ranks): a bundle is input written by a stranger.

const FLOAT = 1; // onnx.TensorProto.FLOAT, and the adapter format's TensorDataType FLOAT

export class BundleError extends Error {}

// --- bytes --------------------------------------------------------------------------------------------------

async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

async function fetchChecked(base, manifest, file) {
  if (typeof file !== 'string' || file.startsWith('/') || file.split('/').includes('..')) {
    throw new BundleError(`${file}: not a path inside the bundle`);
  }
  const want = (manifest.files || {})[file];
  if (!want) throw new BundleError(`${file}: not listed in the manifest's files`);
  const response = await fetch(new URL(file, base));
  if (!response.ok) throw new BundleError(`${file}: HTTP ${response.status}`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  if ((await sha256Hex(bytes)) !== want) {
    throw new BundleError(`${file}: its SHA-256 does not match the manifest (the bundle was changed or damaged)`);
  }
  return bytes;
}

// --- protobuf: just enough of onnx.ModelProto to detach initializers ---------------------------------------

function readVarint(buf, pos) {
  let value = 0;
  let scale = 1;
  for (;;) {
    if (pos >= buf.length) throw new BundleError('the graph file is truncated');
    const b = buf[pos++];
    value += (b & 0x7f) * scale;
    if (b < 0x80) return [value, pos];
    scale *= 128;
    if (scale > 2 ** 56) throw new BundleError('the graph file has a malformed varint');
  }
}

function* fields(buf, start = 0, end = buf.length) {
  let pos = start;
  while (pos < end) {
    const fieldStart = pos;
    let key;
    [key, pos] = readVarint(buf, pos);
    const number = Math.floor(key / 8);
    const wire = key % 8;
    let valueStart = pos;
    if (wire === 0) {
      [, pos] = readVarint(buf, pos);
    } else if (wire === 1) {
      pos += 8;
    } else if (wire === 5) {
      pos += 4;
    } else if (wire === 2) {
      let length;
      [length, pos] = readVarint(buf, pos);
      valueStart = pos;
      pos += length;
    } else {
      throw new BundleError(`the graph file has an unsupported protobuf wire type ${wire}`);
    }
    if (pos > end) throw new BundleError('the graph file is truncated');
    yield { number, wire, fieldStart, valueStart, end: pos };
  }
}

function encodeVarint(value) {
  const out = [];
  while (value >= 0x80) {
    out.push((value % 128) | 0x80);
    value = Math.floor(value / 128);
  }
  out.push(value);
  return Uint8Array.from(out);
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

// TensorProto: dims = 1 (int64, packed or not), data_type = 2, float_data = 4, name = 8, raw_data = 9,
// external_data = 13, data_location = 14.
function decodeTensor(buf, start, end) {
  const dims = [];
  let type = 0;
  let name = '';
  let raw = null;
  const floats = [];
  for (const f of fields(buf, start, end)) {
    if (f.number === 1 && f.wire === 0) dims.push(readVarint(buf, f.valueStart)[0]);
    else if (f.number === 1 && f.wire === 2) {
      for (let p = f.valueStart; p < f.end;) {
        let d;
        [d, p] = readVarint(buf, p);
        dims.push(d);
      }
    } else if (f.number === 2) type = readVarint(buf, f.valueStart)[0];
    else if (f.number === 8) name = new TextDecoder().decode(buf.subarray(f.valueStart, f.end));
    else if (f.number === 9) raw = buf.subarray(f.valueStart, f.end);
    else if (f.number === 4 && f.wire === 2) {
      const view = new DataView(buf.buffer, buf.byteOffset + f.valueStart, f.end - f.valueStart);
      for (let p = 0; p + 4 <= view.byteLength; p += 4) floats.push(view.getFloat32(p, true));
    } else if (f.number === 4 && f.wire === 5) {
      floats.push(new DataView(buf.buffer, buf.byteOffset + f.valueStart, 4).getFloat32(0, true));
    } else if (f.number === 13 || (f.number === 14 && readVarint(buf, f.valueStart)[0] === 1)) {
      throw new BundleError(`${name || 'an initializer'}: stored as external data, which this page cannot read`);
    }
  }
  return { name, dims, type, raw, floats };
}

function tensorName(buf, start, end) {
  for (const f of fields(buf, start, end)) {
    if (f.number === 8 && f.wire === 2) return new TextDecoder().decode(buf.subarray(f.valueStart, f.end));
  }
  return '';
}

function tensorValue(t) {
  if (t.type !== FLOAT) throw new BundleError(`${t.name}: data type ${t.type}, only float32 is supported`);
  const count = t.dims.reduce((a, b) => a * b, 1);
  const data = t.raw ? new Float32Array(t.raw.slice().buffer) : Float32Array.from(t.floats);
  if (data.length !== count) throw new BundleError(`${t.name}: ${data.length} values for shape [${t.dims}]`);
  return { dims: t.dims, data };
}

/**
 * The graph without the default initializers of `names`, and those defaults.
 * ModelProto.graph = 7; GraphProto.initializer = 5.
 */
export function detachDefaults(model, names) {
  const wanted = new Set(names);
  const defaults = {};
  const parts = [];
  let graphs = 0;
  for (const f of fields(model)) {
    if (f.number !== 7 || f.wire !== 2) {
      parts.push(model.subarray(f.fieldStart, f.end));
      continue;
    }
    graphs += 1;
    const graph = [];
    for (const g of fields(model, f.valueStart, f.end)) {
      if (g.number === 5 && g.wire === 2) {
        const name = tensorName(model, g.valueStart, g.end);
        if (wanted.has(name)) {
          defaults[name] = tensorValue(decodeTensor(model, g.valueStart, g.end));
          continue;
        }
      }
      graph.push(model.subarray(g.fieldStart, g.end));
    }
    const body = concat(graph);
    parts.push(Uint8Array.of(7 * 8 + 2), encodeVarint(body.length), body);
  }
  if (graphs !== 1) throw new BundleError('the graph file has no graph');
  const missing = names.filter((n) => !(n in defaults));
  if (missing.length) throw new BundleError(`${missing[0]}: the graph has no default for this adapter input`);
  return { model: concat(parts), defaults };
}

// --- .onnx_adapter: onnxruntime's flatbuffer (onnxruntime/lora/adapter_format/adapter_schema.fbs) ----------
// table Adapter { format_version:int; adapter_version:int; model_version:int; parameters:[Parameter]; }
// table Parameter { name:string; dims:[long]; data_type:TensorDataType(int); raw_data:[ubyte]; }

export function readAdapter(bytes) {
  const buffer = bytes.slice().buffer;
  const dv = new DataView(buffer);
  const check = (p, n) => {
    if (p < 0 || p + n > buffer.byteLength) throw new BundleError('the adapter file is truncated or malformed');
    return p;
  };
  const field = (table, i) => {
    const vt = check(table - dv.getInt32(check(table, 4), true), 4);
    const len = dv.getUint16(vt, true);
    const off = 4 + 2 * i < len ? dv.getUint16(check(vt + 4 + 2 * i, 2), true) : 0;
    return off ? table + off : 0;
  };
  const deref = (p) => p + dv.getUint32(check(p, 4), true);
  const vector = (p, size) => {
    const v = deref(p);
    const n = dv.getUint32(check(v, 4), true);
    check(v + 4, n * size);
    return [v + 4, n];
  };
  const params = {};
  const pf = field(deref(0), 3);
  if (!pf) return params;
  const [start, n] = vector(pf, 4);
  for (let k = 0; k < n; k++) {
    const t = deref(start + 4 * k);
    const nameField = field(t, 0);
    const dimsField = field(t, 1);
    const rawField = field(t, 3);
    if (!nameField || !dimsField || !rawField) throw new BundleError('an adapter parameter lacks name, dims or data');
    const [ns, nl] = vector(nameField, 1);
    const name = new TextDecoder().decode(new Uint8Array(buffer, ns, nl));
    const [ds, dl] = vector(dimsField, 8);
    const dims = Array.from({ length: dl }, (_, j) => Number(dv.getBigInt64(ds + 8 * j, true)));
    const typeField = field(t, 2);
    const type = typeField ? dv.getInt32(check(typeField, 4), true) : 0;
    if (type !== FLOAT) throw new BundleError(`${name}: data type ${type}, only float32 is supported`);
    const [rs, rl] = vector(rawField, 1);
    const count = dims.reduce((a, b) => a * b, 1);
    if (rl !== 4 * count) throw new BundleError(`${name}: ${rl} bytes for shape [${dims}]`);
    params[name] = { dims, data: new Float32Array(buffer.slice(rs, rs + rl)) };
  }
  return params;
}

// The adapter's tensors against the graph's interface (manifest.adapters.interface).
function checkAdapter(adapterName, params, interfaceSpec) {
  const expected = {};
  for (const [module, m] of Object.entries(interfaceSpec.lora_modules)) {
    const [a, b] = m.inputs;
    expected[a] = { module, axis: 0, size: m.in_features };
    expected[b] = { module, axis: 1, size: m.out_features };
  }
  for (const [name, p] of Object.entries(interfaceSpec.full_parameters || {})) expected[name] = { shape: p.shape };
  for (const [name, t] of Object.entries(params)) {
    const e = expected[name];
    if (!e) throw new BundleError(`${adapterName}: ${name} is not an input of this bundle's graph`);
    const ok = e.shape ? JSON.stringify(t.dims) === JSON.stringify(e.shape) : t.dims.length === 2 && t.dims[e.axis] === e.size;
    if (!ok) throw new BundleError(`${adapterName}: ${name} has shape [${t.dims}], which the graph does not take`);
  }
  for (const m of Object.values(interfaceSpec.lora_modules)) {
    const [a, b] = m.inputs;
    if ((a in params) !== (b in params)) throw new BundleError(`${adapterName}: ${a} and ${b} come only as a pair`);
    if (a in params && params[a].dims[1] !== params[b].dims[0]) {
      throw new BundleError(`${adapterName}: ${a} and ${b} have different ranks`);
    }
  }
}

// --- the model ----------------------------------------------------------------------------------------------

export class SwappableBundle {
  /**
   * @param ort the onnxruntime-web module
   * @param bundleUrl the bundle's folder, ending in '/'
   * @param options.variant a variant of manifest.variants (default: fp32)
   */
  static async load(ort, bundleUrl, { variant = 'fp32', sessionOptions = { executionProviders: ['wasm'] } } = {}) {
    const base = new URL(bundleUrl, location.href);
    const response = await fetch(new URL('manifest.json', base));
    if (!response.ok) throw new BundleError(`manifest.json: HTTP ${response.status}`);
    const manifest = await response.json();
    const adapters = manifest.adapters;
    if (!adapters || adapters.mode !== 'swappable') {
      throw new BundleError('this bundle has no swappable adapters; export it with --keep-adapters');
    }
    const v = manifest.variants[variant];
    if (!v) throw new BundleError(`${variant}: no such variant (this bundle has ${Object.keys(manifest.variants)})`);
    if ((v.data_files || []).length) throw new BundleError(`${variant}: stored with external data, too large for a page`);
    const inputNames = [];
    for (const m of Object.values(adapters.interface.lora_modules)) inputNames.push(...m.inputs);
    inputNames.push(...Object.keys(adapters.interface.full_parameters || {}));
    const { model, defaults } = detachDefaults(await fetchChecked(base, manifest, v.file), inputNames);
    const items = {};
    for (const [name, item] of Object.entries(adapters.items)) {
      const params = readAdapter(await fetchChecked(base, manifest, item.file));
      checkAdapter(name, params, adapters.interface);
      items[name] = params;
    }
    const session = await ort.InferenceSession.create(model, sessionOptions);
    return new SwappableBundle(ort, manifest, session, defaults, items, inputNames);
  }

  constructor(ort, manifest, session, defaults, items, inputNames) {
    this.ort = ort;
    this.manifest = manifest;
    this.session = session;
    this.defaults = defaults;
    this.items = items;
    this.adapterInputs = inputNames;
    this.adapterNames = Object.keys(items);
    // A base whose head was never trained (a classifier's new head lives in each adapter) has nothing to say.
    this.baseRuns = !(manifest.adapters.untrained_base_tensors || []).length;
  }

  labels(adapter) {
    const item = adapter === null ? null : this.manifest.adapters.items[adapter];
    return (item && item.labels) || this.manifest.labels || null;
  }

  /** Run the graph on the text inputs `feeds` (ort.Tensors) with `adapter` active (null: the base). */
  async run(feeds, adapter) {
    if (adapter === null && !this.baseRuns) {
      throw new BundleError(`the base has no trained head; choose an adapter (${this.adapterNames})`);
    }
    if (adapter !== null && !(adapter in this.items)) {
      throw new BundleError(`${adapter}: no such adapter (this bundle has ${this.adapterNames})`);
    }
    const params = adapter === null ? {} : this.items[adapter];
    const all = { ...feeds };
    for (const name of this.adapterInputs) {
      const t = params[name] || this.defaults[name];
      all[name] = new this.ort.Tensor('float32', t.data, t.dims);
    }
    return this.session.run(all);
  }
}

/** The text inputs the graph takes, from a transformers.js tokenizer's output, as int64 ort.Tensors. */
export function textFeeds(ort, manifest, encoded) {
  const feeds = {};
  for (const input of manifest.inputs) {
    let t = encoded[input.name];
    if (!t && input.name === 'token_type_ids') t = { data: new Array(encoded.input_ids.data.length).fill(0), dims: encoded.input_ids.dims };
    if (!t) throw new BundleError(`${input.name}: the tokenizer does not produce this input`);
    feeds[input.name] = new ort.Tensor('int64', BigInt64Array.from(t.data, (x) => BigInt(x)), t.dims);
  }
  return feeds;
}
