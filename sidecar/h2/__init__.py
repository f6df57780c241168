"""HTTP/2 as the splice reads it: frames and header blocks, walked without a full parser."""
