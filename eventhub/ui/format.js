// Figures as operators read them. A missing figure (null: no calls yet) is a dash, never "null".
const DASH = "—";

/** 12.3 ms, 1.24 s. */
export function millis(ms) {
  if (ms === null || ms === undefined) return DASH;
  return ms < 1000 ? `${Number(ms).toFixed(1)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** A rate from 0 to 1 as a percentage: 0.0833 is 8.3 %. */
export function percent(rate) {
  if (rate === null || rate === undefined) return DASH;
  return `${(Number(rate) * 100).toFixed(1)} %`;
}

/** 42 s, 3 min 5 s, 2 h 10 min. */
export function seconds(s) {
  if (s === null || s === undefined) return DASH;
  if (s < 60) return `${Number(s).toFixed(s < 10 && s % 1 ? 1 : 0)} s`;
  const whole = Math.round(s);
  if (whole < 3600) return `${Math.floor(whole / 60)} min${whole % 60 ? ` ${whole % 60} s` : ""}`;
  const minutes = Math.floor((whole % 3600) / 60);
  return `${Math.floor(whole / 3600)} h${minutes ? ` ${minutes} min` : ""}`;
}

/** [["v1", 90], ["v2", 10]] as "v1 90 % · v2 10 %". */
export function weights(pairs) {
  return pairs.map(([version, weight]) => `${version} ${weight} %`).join(" · ");
}
