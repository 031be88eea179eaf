/* Darknet's own loader and saver, for the weights round-trip tests.
   Usage: resave CFG WEIGHTS OUT.weights
   load_network (without clearing "seen"), then save_weights: the file Darknet writes for
   the tensors it read. Prints the header's "seen". */
#include <stdio.h>
#include "darknet.h"

int main(int argc, char **argv)
{
    if (argc != 4) { fprintf(stderr, "usage: %s CFG WEIGHTS OUT\n", argv[0]); return 2; }
    network *net = load_network(argv[1], argv[2], 0);
    save_weights(net, argv[3]);
    printf("%lu\n", (unsigned long)*net->seen);
    return 0;
}
