// Reductions over a workgroup of WORKGROUP lanes, for kernels that spread one long row over
// a workgroup so that no invocation's loops pass the bound (ARCHITECTURE.md, "Loop bound").
// Every lane must call them, from uniform control flow; each hands the result to every lane.

var<workgroup> lane_values: array<f32, WORKGROUP>;
var<workgroup> lane_indices: array<u32, WORKGROUP>;

fn row_sum(lane: u32, value: f32) -> f32 {
    lane_values[lane] = value;
    workgroupBarrier();
    for (var half = WORKGROUP / 2u; half > 0u; half >>= 1u) {
        if lane < half { lane_values[lane] += lane_values[lane + half]; }
        workgroupBarrier();
    }
    let total = lane_values[0];
    workgroupBarrier();
    return total;
}

fn row_max(lane: u32, value: f32) -> f32 {
    lane_values[lane] = value;
    workgroupBarrier();
    for (var half = WORKGROUP / 2u; half > 0u; half >>= 1u) {
        if lane < half { lane_values[lane] = max(lane_values[lane], lane_values[lane + half]); }
        workgroupBarrier();
    }
    let top = lane_values[0];
    workgroupBarrier();
    return top;
}

// The first index of the row's largest value, from each lane's largest value and its first
// index: of equal values the smaller index wins.
fn row_argmax(lane: u32, value: f32, index: u32) -> u32 {
    lane_values[lane] = value;
    lane_indices[lane] = index;
    workgroupBarrier();
    for (var half = WORKGROUP / 2u; half > 0u; half >>= 1u) {
        if lane < half {
            let z = lane_values[lane + half];
            let other = lane_indices[lane + half];
            if z > lane_values[lane] || (z == lane_values[lane] && other < lane_indices[lane]) {
                lane_values[lane] = z;
                lane_indices[lane] = other;
            }
        }
        workgroupBarrier();
    }
    let best = lane_indices[0];
    workgroupBarrier();
    return best;
}

// The row of workgroup `wid` in a grid spread over x and y (`dispatch::grid`).
fn row_of(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}
