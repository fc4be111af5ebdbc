// Adaptive average pooling to an OH×OW output, PyTorch's windows: output row i averages input
// rows floor(i·H/OH) .. ceil((i+1)·H/OH) (exclusive end), columns likewise; windows may
// overlap by one row or column. The shape is baked in per pipeline.

override H: u32;
override W: u32;
override OH: u32;
override OW: u32;

struct Params {
    total: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

// The window [start, end) of output `i` along an axis of `n` inputs and `out` outputs.
fn window(i: u32, n: u32, out: u32) -> vec2<u32> {
    return vec2<u32>((i * n) / out, ((i + 1u) * n + out - 1u) / out);
}

// src = x [planes][H][W], dst = y [planes][OH][OW]
@compute @workgroup_size(WORKGROUP)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = invocation_index(gid, nwg);
    if o >= p.total { return; }
    let ox = o % OW;
    let oy = (o / OW) % OH;
    let plane = o / (OW * OH);
    let rows = window(oy, H, OH);
    let cols = window(ox, W, OW);
    var sum = 0.0;
    for (var y = rows.x; y < rows.y; y++) {
        for (var x = cols.x; x < cols.y; x++) {
            sum += src[(plane * H + y) * W + x];
        }
    }
    dst[o] = sum / f32((rows.y - rows.x) * (cols.y - cols.x));
}

// src = dy [planes][OH][OW], dst = dx [planes][H][W]: each input pixel gathers from the
// windows that hold it.
@compute @workgroup_size(WORKGROUP)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = invocation_index(gid, nwg);
    if i >= p.total { return; }
    let x = i % W;
    let y = (i / W) % H;
    let plane = i / (W * H);
    // The windows holding row y are outputs ⌊y·OH/H⌋ ..= ⌈(y+1)·OH/H⌉ − 1 (several when
    // upsampling); columns likewise. The bounds test guards the integer rounding.
    let oy_range = vec2<u32>((y * OH) / H, ((y + 1u) * OH + H - 1u) / H);
    let ox_range = vec2<u32>((x * OW) / W, ((x + 1u) * OW + W - 1u) / W);
    var sum = 0.0;
    for (var oy = oy_range.x; oy < min(oy_range.y, OH); oy++) {
        let rows = window(oy, H, OH);
        if y < rows.x || y >= rows.y { continue; }
        for (var ox = ox_range.x; ox < min(ox_range.y, OW); ox++) {
            let cols = window(ox, W, OW);
            if x < cols.x || x >= cols.y { continue; }
            let count = f32((rows.y - rows.x) * (cols.y - cols.x));
            sum += src[(plane * OH + oy) * OW + ox] / count;
        }
    }
    dst[i] = sum;
}
