/* Smallest harness: parse a cfg with Darknet's parser and print the network's shape.
   Usage: version CFG  ->  "inputs outputs n_layers w h c" */
#include <stdio.h>
#include "darknet.h"

int main(int argc, char **argv)
{
    if (argc != 2) { fprintf(stderr, "usage: %s CFG\n", argv[0]); return 2; }
    network *net = parse_network_cfg(argv[1]);
    printf("%d %d %d %d %d %d\n", net->inputs, net->outputs, net->n, net->w, net->h, net->c);
    return 0;
}
