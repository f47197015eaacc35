"""ctl: the Piccolo control daemon (`piccolo-ctld`) and its CLI (`piccoloctl`)."""
